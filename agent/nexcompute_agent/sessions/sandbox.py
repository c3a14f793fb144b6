"""The session sandbox: one per session, built with bubblewrap, limited by cgroups.

What a sandbox is (``docs/sandbox.md`` has the why):

- **bubblewrap** (``bwrap``, the sandbox tool behind Flatpak), run by the root agent without a
  user namespace: a new PID namespace (bwrap is its init; killing it makes the kernel kill every
  process in it, however fast they fork), a new IPC namespace (SysV IPC and POSIX queues die with
  it), a new mount namespace with the host bound read-only, a fresh ``/proc`` and a minimal
  ``/dev`` (GPU device nodes bound in), private size-capped ``tmpfs`` on ``/tmp``, ``/var/tmp``,
  ``/dev/shm``, ``/run/user`` and ``/run/lock``, the agent's own folders and people's homes masked,
  and the session's workspace as the only writable host path. The host network stays.
- Inside, ``setpriv`` (util-linux) drops to the session account: all capabilities and the
  bounding set cleared, ``no_new_privs`` set (setuid programs gain nothing), no supplementary
  groups. Then it execs Jupyter.
- **Limits** in a cgroup per session, v2 where the host has it, else v1 controllers (memory,
  cpu, pids, freezer): memory (RAM and swap, hard), CPU weight (and an optional quota), tasks.
  The sandbox joins the cgroup before bwrap runs (``preexec``), so everything in it is counted.
- **Workspace**: a size-capped ext4 file system in a sparse image file, loop-mounted ``nosuid,
  nodev`` (HTCondor does the same for per-job scratch with LVM or loop devices). Removing the
  image removes every file of the session at once, however many or deep.

Where a part is missing the sandbox says so (``HostSupport``) and ``nexcompute-agent probe``
prints it; without bubblewrap a root agent refuses sessions rather than run them unconfined.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    from collections.abc import Callable

    from nexcompute_agent.protocol import SessionLimits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "nexcompute"  # the agent's config (session_cgroup_parent) may rename it


def set_cgroup_parent(name: str) -> None:
    """Name the folder the sessions' cgroups live in (``session-<id>`` under it). Two agents on
    one host (test runs side by side) must not share it: session ids are only unique per
    server, and each agent kills and removes whatever is in its session's cgroup."""
    global CGROUP_PARENT
    CGROUP_PARENT = name


V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")
TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # noqa: S108
MASKED_DIRS = ("/home", "/root", "/media", "/mnt", "/run/media", "/srv",
               # host services reachable through their sockets (print jobs, the system bus)
               "/run/dbus", "/run/cups", "/run/avahi-daemon")  # fmt: skip
GPU_DEVICE_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/*", "/dev/kfd")
MIN_BWRAP = (0, 7, 0)  # --size (size-capped tmpfs) came in 0.7.0
DEFAULT_TMPFS_BYTES = 1 << 30  # per temp folder when the policy gives no workspace size
MKFS_TIMEOUT = 30.0
MOUNT_TIMEOUT = 30.0


class SandboxError(Exception):
    """The sandbox could not be built; the text says why (sent as ``session.failed``)."""


# --- what this host can do ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostSupport:
    """Which isolation and limits this host can enforce (``probe`` prints it)."""

    root: bool
    bwrap: str | None
    setpriv: str | None
    bwrap_version: tuple[int, ...] = ()
    swap_limit: bool = False
    cgroup: str | None = None  # "v2", "v1" or None
    controllers: tuple[str, ...] = ()
    loop_workspace: bool = False
    mkfs: str | None = None

    @property
    def problem(self) -> str | None:
        """Why this host cannot sandbox sessions, or None."""
        if self.bwrap is None or self.setpriv is None:
            return (
                "bubblewrap (bwrap) or setpriv is missing; install them (Debian/Ubuntu: "
                "apt-get install bubblewrap util-linux)"
            )
        if self.bwrap_version < MIN_BWRAP:
            have = ".".join(map(str, self.bwrap_version)) or "unknown"
            need = ".".join(map(str, MIN_BWRAP))
            return f"bubblewrap {have} is too old: the sandbox needs {need} or newer (--size)"
        return None

    def lines(self) -> list[str]:
        out = [
            f"sandbox: {'bubblewrap ' + self.bwrap if self.bwrap else 'MISSING bubblewrap'}"
            f" + {'setpriv' if self.setpriv else 'MISSING setpriv'}"
            + ("" if self.root else " (agent not root: sessions are not sandboxed)"),
            f"cgroup: {self.cgroup or 'none'}"
            + (f" ({', '.join(self.controllers)})" if self.controllers else ""),
            f"memory limit: {'enforced' if 'memory' in self.controllers else 'not enforced'}"
            + (
                ""
                if "memory" not in self.controllers or self.swap_limit
                else " (RAM only: this host does not account swap to cgroups)"
            ),  # fmt: skip
            f"cpu weight: {'enforced' if 'cpu' in self.controllers else 'not enforced'}",
            "tasks limit: "
            + ("enforced (pids)" if "pids" in self.controllers else "RLIMIT_NPROC per account"),
            "workspace size: "
            + ("enforced (loop-mounted ext4)" if self.loop_workspace else "not enforced"),
        ]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "bwrap": self.bwrap,
            "bwrap_version": ".".join(map(str, self.bwrap_version)),
            "problem": self.problem,
            "swap_limit": self.swap_limit,
            "setpriv": self.setpriv,
            "cgroup": self.cgroup,
            "controllers": list(self.controllers),
            "loop_workspace": self.loop_workspace,
            "limits": {
                "memory": "memory" in self.controllers,
                "cpu": "cpu" in self.controllers,
                "tasks": "pids" in self.controllers,
                "workspace": self.loop_workspace,
            },
        }


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (
            p
            for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
            if os.access(p := f"{d}/{name}", os.X_OK)
        ),
        None,
    )


def _bwrap_version(bwrap: str | None) -> tuple[int, ...]:
    if bwrap is None:
        return ()
    try:
        out = subprocess.run(  # noqa: S603
            [bwrap, "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups(default="0")) if m else ()


def cgroup_version() -> str | None:
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        return "v2"
    if (CGROUP_ROOT / "memory" / "cgroup.procs").is_file():
        return "v1"
    return None


def detect() -> HostSupport:
    root = os.name == "posix" and os.geteuid() == 0
    version = cgroup_version()
    controllers: tuple[str, ...] = ()
    if version == "v2":
        with contextlib.suppress(OSError):
            have = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
            controllers = tuple(c for c in ("memory", "cpu", "pids") if c in have)
    elif version == "v1":
        controllers = tuple(
            c for c in V1_CONTROLLERS if (CGROUP_ROOT / c / "cgroup.procs").is_file()
        )
    swap = (
        (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()
        if version == "v1"
        else version == "v2" and "memory" in controllers
    )
    bwrap = _find("bwrap")
    mkfs = _find("mkfs.ext4")
    loop = (
        root and mkfs is not None and os.path.exists("/dev/loop-control") and bool(_find("mount"))
    )
    return HostSupport(
        root=root,
        bwrap=bwrap,
        bwrap_version=_bwrap_version(bwrap),
        swap_limit=swap,
        setpriv=_find("setpriv"),
        cgroup=version if root else None,
        controllers=controllers if root else (),
        loop_workspace=loop,
        mkfs=mkfs,
    )


# --- cgroups -----------------------------------------------------------------------------------


@dataclass
class Cgroups:
    """The session's cgroup(s): one directory on v2, one per controller on v1."""

    session_id: int
    version: str | None
    paths: dict[str, Path] = field(default_factory=dict)  # controller ("" on v2) -> directory
    details: list[str] = field(default_factory=list)
    oom_seen: int = 0
    pids_max_seen: int = 0

    @classmethod
    def create(cls, session_id: int, limits: SessionLimits, support: HostSupport) -> Cgroups:
        cg = cls(session_id=session_id, version=support.cgroup)
        name = f"session-{session_id}"
        try:
            if support.cgroup == "v2":
                cg._create_v2(name, limits, support)
            elif support.cgroup == "v1":
                cg._create_v1(name, limits, support)
        except OSError as exc:
            cg.remove()
            raise SandboxError(
                f"cannot set up the session's cgroup: {exc.strerror or exc}"
            ) from None
        return cg

    def _create_v2(self, name: str, limits: SessionLimits, support: HostSupport) -> None:
        parent = v2_parent()
        enable = " ".join(f"+{c}" for c in support.controllers)
        try:
            if enable:
                (parent.parent / "cgroup.subtree_control").write_text(enable)
            parent.mkdir(exist_ok=True)
            if enable:
                (parent / "cgroup.subtree_control").write_text(enable)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"{exc.strerror} at {parent}: under systemd the agent's unit needs Delegate=yes",
            ) from None
        path = parent / name
        path.mkdir(exist_ok=True)
        self.paths[""] = path
        if "memory" in support.controllers and limits.memory_bytes:
            (path / "memory.max").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
            with contextlib.suppress(OSError):
                (path / "memory.oom.group").write_text("0")
        if "cpu" in support.controllers:
            # Jupyter starts at the normal weight (the machine is only offered with no owner
            # present); set_cpu_weight() lowers it once the session is ready.
            (path / "cpu.weight").write_text("100")
            if limits.cpu_quota:
                (path / "cpu.max").write_text(f"{int(limits.cpu_quota * 100_000)} 100000")
        if "pids" in support.controllers and limits.max_tasks:
            (path / "pids.max").write_text(str(limits.max_tasks))

    def _create_v1(self, name: str, limits: SessionLimits, support: HostSupport) -> None:
        for ctrl in support.controllers:
            parent = CGROUP_ROOT / ctrl / CGROUP_PARENT
            parent.mkdir(exist_ok=True)
            path = parent / name
            path.mkdir(exist_ok=True)
            self.paths[ctrl] = path
        if (mem := self.paths.get("memory")) and limits.memory_bytes:
            (mem / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            # RAM + swap: without it a session would push the desktop into swap instead.
            with contextlib.suppress(OSError):
                (mem / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))
        if cpu := self.paths.get("cpu"):
            # v2's weight 100 is v1's 1024 shares.
            (cpu / "cpu.shares").write_text("1024")  # lowered once ready: set_cpu_weight()
            if limits.cpu_quota:
                (cpu / "cpu.cfs_period_us").write_text("100000")
                (cpu / "cpu.cfs_quota_us").write_text(str(int(limits.cpu_quota * 100_000)))
        if (pids := self.paths.get("pids")) and limits.max_tasks:
            (pids / "pids.max").write_text(str(limits.max_tasks))

    def set_cpu_weight(self, weight: int) -> None:
        """The session's CPU weight (cgroup v2's scale; v1 shares are weight × 1024 / 100)."""
        if self.version == "v2" and "" in self.paths:
            (self.paths[""] / "cpu.weight").write_text(str(weight))
        elif cpu := self.paths.get("cpu"):
            (cpu / "cpu.shares").write_text(str(max(2, weight * 1024 // 100)))

    def describe(self, limits: SessionLimits) -> str:
        if not self.paths:
            return "limits: no cgroup on this host (tasks by RLIMIT_NPROC only)"
        where = ", ".join(str(p) for p in self.paths.values())
        return (
            f"limits: cgroup {self.version} {where} (memory={limits.memory_bytes or 'unlimited'}, "
            f"cpu weight={limits.cpu_weight}, cpus={limits.cpu_quota or 'all'}, "
            f"tasks={limits.max_tasks or 'unlimited'})"
        )

    def join(self) -> Callable[[], None]:
        """A preexec step: move the calling (child) process into every cgroup of the session."""
        files = [str(p / "cgroup.procs") for p in self.paths.values()]

        def apply() -> None:
            for name in files:
                fd = os.open(name, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        return apply

    def procs(self) -> list[int]:
        out: set[int] = set()
        for path in self.paths.values():
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in (path / "cgroup.procs").read_text().split())
        return sorted(out)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for the memory limit so far."""
        if self.version == "v2" and "" in self.paths:
            return _keyed(self.paths[""] / "memory.events", "oom_kill")
        if mem := self.paths.get("memory"):
            return _keyed(mem / "memory.oom_control", "oom_kill")
        return 0

    def tasks_limit_hits(self) -> int:
        path = self.paths.get("") if self.version == "v2" else self.paths.get("pids")
        return _keyed(path / "pids.events", "max") if path else 0

    def kill(self) -> None:
        """Kill every process in the cgroup (the PID namespace's end is the main path; this is
        the second lock)."""
        if self.version == "v2" and "" in self.paths:
            with contextlib.suppress(OSError):
                (self.paths[""] / "cgroup.kill").write_text("1")
                return
        freezer = self.paths.get("freezer")
        if freezer is not None:
            with contextlib.suppress(OSError):
                (freezer / "freezer.state").write_text("FROZEN")
        for pid in self.procs():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if freezer is not None:
            with contextlib.suppress(OSError):
                (freezer / "freezer.state").write_text("THAWED")

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left and remove the directories. True when all are gone."""
        if not self.paths:
            return True
        deadline = time.monotonic() + timeout
        while True:
            self.kill()
            left = []
            for path in self.paths.values():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(path)
            if not left or time.monotonic() > deadline:
                if left:
                    self.details.append("cgroup not removed: " + ", ".join(map(str, left)))
                return not left
            time.sleep(0.05)

    @classmethod
    def existing(cls, session_id: int) -> Cgroups:
        """The session's cgroups as left by an earlier agent (recovery)."""
        version = cgroup_version()
        cg = cls(session_id=session_id, version=version)
        name = f"session-{session_id}"
        if version == "v2":
            path = v2_parent() / name
            if path.is_dir():
                cg.paths[""] = path
        elif version == "v1":
            for ctrl in V1_CONTROLLERS:
                path = CGROUP_ROOT / ctrl / CGROUP_PARENT / name
                if path.is_dir():
                    cg.paths[ctrl] = path
        return cg


def v2_parent() -> Path:
    """Where the sessions' cgroups live on cgroup v2: ``nexcompute`` under the agent's own
    cgroup when systemd gave it one (its unit with ``Delegate=yes``; the agent first moves itself
    into a leaf ``agent`` child, since a cgroup with processes cannot hand controllers down),
    else under the root."""
    own = "/"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = line[3:] or "/"
    if own in ("/", ""):
        return CGROUP_ROOT / CGROUP_PARENT
    base = CGROUP_ROOT / own.lstrip("/")
    if base.name == "agent":  # moved already (by an earlier call)
        return base.parent / CGROUP_PARENT
    with contextlib.suppress(OSError):
        leaf = base / "agent"
        leaf.mkdir(exist_ok=True)
        for pid in (base / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
    return base / CGROUP_PARENT


def leftover_cgroup_sessions() -> list[int]:
    """Session ids of cgroups an earlier agent left (recovery)."""
    found: set[int] = set()
    bases = [v2_parent()] + [CGROUP_ROOT / c / CGROUP_PARENT for c in V1_CONTROLLERS]
    for base in bases:
        with contextlib.suppress(OSError):
            for entry in base.iterdir():
                if m := re.fullmatch(r"session-([0-9]{1,15})", entry.name):
                    found.add(int(m.group(1)))
    return sorted(found)


def _keyed(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
    except (OSError, ValueError):
        pass
    return 0


# --- workspace ---------------------------------------------------------------------------------


@dataclass
class Workspace:
    """The session's only writable host folder: a loop-mounted ext4 image when this host can
    cap its size, else a plain 0700 folder."""

    path: Path
    image: Path | None = None
    baseline_inodes: int = 0
    baseline_bytes: int = 0

    @classmethod
    def create(
        cls, path: Path, *, uid: int, gid: int, size_bytes: int | None, support: HostSupport
    ) -> Workspace:
        root = path.parent
        if not root.exists():
            root.mkdir(mode=0o711, parents=True)
        path.mkdir(mode=0o700)
        ws = cls(path=path)
        if size_bytes and support.loop_workspace and support.mkfs:
            images = root / ".images"
            images.mkdir(mode=0o700, exist_ok=True)
            os.chmod(images, 0o700)
            ws.image = images / f"{path.name}.img"
            try:
                fd = os.open(ws.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    # Reserved now, not sparse: a full workspace is the student's ENOSPC, never
                    # a full host disk (a sparse image could outgrow the disk's free space).
                    os.posix_fallocate(fd, 0, size_bytes)
                except OSError as exc:
                    free = shutil.disk_usage(root).free
                    raise SandboxError(
                        f"no room for a {size_bytes / 2**30:.1f} GB workspace on {root} "
                        f"({free / 2**30:.1f} GB free): {exc.strerror}"
                    ) from None
                finally:
                    os.close(fd)
                # No journal (the image dies with the session); no blocks reserved for
                # growing it online (it is never resized): mkfs in ~3 ms instead of ~10.
                _run(
                    [support.mkfs, "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
                     "-E", f"lazy_itable_init=1,nodiscard,root_owner={uid}:{gid}",
                     str(ws.image)],
                    MKFS_TIMEOUT,
                )  # fmt: skip
                _run(["mount", "-o", "loop,nosuid,nodev,noatime", str(ws.image), str(path)],
                     MOUNT_TIMEOUT)  # fmt: skip
            except (OSError, SandboxError) as exc:
                ws.destroy()
                raise SandboxError(f"cannot make the session's workspace: {exc}") from None
            with contextlib.suppress(OSError):
                (path / "lost+found").rmdir()
        os.chown(path, uid, gid)
        os.chmod(path, 0o700)
        ws.baseline_inodes, ws.baseline_bytes = ws.usage()
        return ws

    @property
    def mounted(self) -> bool:
        return self.image is not None and os.path.ismount(self.path)

    def usage(self) -> tuple[int, int]:
        """(inodes, bytes) in use on the workspace's own file system."""
        if self.image is None:
            return 0, 0
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0, 0
        return st.f_files - st.f_ffree, (st.f_blocks - st.f_bfree) * st.f_frsize

    def destroy(self) -> tuple[int, int, list[str]]:
        """Unmount and delete the image (every file of the session goes with it). Returns
        (inodes, bytes) that were in use and problems. A plain folder is left to the wiper."""
        problems: list[str] = []
        inodes = size = 0
        if self.image is not None:
            if os.path.ismount(self.path):
                used_inodes, used_bytes = self.usage()
                inodes = max(0, used_inodes - self.baseline_inodes)
                size = max(0, used_bytes - self.baseline_bytes)
                try:
                    _run(["umount", str(self.path)], MOUNT_TIMEOUT)
                except SandboxError as exc:
                    problems.append(f"umount {self.path}: {exc}; detached lazily")
                    with contextlib.suppress(SandboxError):
                        _run(["umount", "-l", str(self.path)], MOUNT_TIMEOUT)
            try:
                self.image.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove {self.image}: {exc.strerror}")
            with contextlib.suppress(OSError):
                if not os.path.ismount(self.path):
                    self.path.rmdir()
        return inodes, size, problems

    @classmethod
    def existing(cls, path: Path) -> Workspace:
        image = path.parent / ".images" / f"{path.name}.img"
        return cls(path=path, image=image if image.exists() or os.path.ismount(path) else None)


def _run(argv: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(  # noqa: S603
            argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        raise SandboxError(f"`{argv[0]}` did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise SandboxError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
        raise SandboxError(f"`{' '.join(argv[:2])} …` exited {proc.returncode}: {err}")


# --- the bwrap command line --------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxSpec:
    workspace: Path
    uid: int
    gid: int
    tmpfs_bytes: int
    hide: tuple[str, ...] = ()  # agent folders (workspace root, state dir) masked inside
    show: tuple[str, ...] = ()  # read-only again after the masks (the session environment)
    gpus: bool = True


def bwrap_argv(support: HostSupport, spec: SandboxSpec, command: list[str]) -> list[str]:
    """``bwrap … -- setpriv … -- command``: the whole sandbox in one argv."""
    if support.problem is not None or support.bwrap is None or support.setpriv is None:
        raise SandboxError(f"this machine cannot sandbox sessions: {support.problem}")
    ws = str(spec.workspace)
    argv = [
        support.bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-cgroup-try",
        "--ro-bind", "/", "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--mqueue", "/dev/mqueue",
    ]  # fmt: skip
    if spec.gpus:
        for pattern in GPU_DEVICE_GLOBS:
            for dev in sorted(glob.glob(pattern)):
                argv += ["--dev-bind-try", dev, dev]
    replaced: list[str] = []
    for folder in TMPFS_DIRS:
        if os.path.isdir(folder):  # the read-only root cannot get new mount points
            argv += ["--perms", "1777", "--size", str(spec.tmpfs_bytes), "--tmpfs", folder]
            replaced.append(folder)
    if os.path.isdir("/run/user"):
        argv += ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", "/run/user"]
        replaced.append("/run/user")
    for folder in (*MASKED_DIRS, *spec.hide):
        if os.path.isdir(folder) and not _inside(folder, replaced):
            argv += ["--perms", "0755", "--tmpfs", folder]
            replaced.append(folder)
    for path in (*spec.show, ws):
        # bwrap makes missing parents 0700 root: make them 0755 ourselves.
        for parent in reversed(Path(path).parents):
            if _inside(str(parent), replaced) and str(parent) not in replaced:
                argv += ["--perms", "0755", "--dir", str(parent)]
    for path in spec.show:
        if os.path.isdir(path) and _inside(path, replaced):
            argv += ["--ro-bind", path, path]
    argv += ["--bind", ws, ws, "--chdir", ws]
    argv += [
        "--",
        support.setpriv,
        f"--reuid={spec.uid}",
        f"--regid={spec.gid}",
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        *command,
    ]
    return argv


def _inside(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


# --- finding a sandbox again -------------------------------------------------------------------


def sandbox_init(outer_pid: int) -> psutil.Process | None:
    """bwrap's init inside the PID namespace (the outer bwrap's only child)."""
    try:
        children = psutil.Process(outer_pid).children()
    except psutil.Error:
        return None
    return children[0] if children else None


def end_namespace(init_pid: int | None, create_time: float | None) -> bool:
    """SIGKILL the sandbox's init: the kernel then kills every process of its PID namespace.
    Checked by start time, never by pid alone. False when it was already gone."""
    if init_pid is None:
        return False
    try:
        proc = psutil.Process(init_pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return False
        proc.send_signal(signal.SIGKILL)
        return True
    except psutil.Error:
        return False
