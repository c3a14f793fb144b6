"""Wiping a session account and proving that nothing of it is left.

Each session runs as a pooled account (``nxs-N``) inside a sandbox. When the sandbox is gone,
``wipe_account`` removes what the account may have left on the host and ``prove_clean`` checks,
one named check at a time, that nothing is left. The checks rely on what the kernel counts or
what a complete walk finds, not on a ``/proc`` scan that a fast forker can outrun:

- processes: ``kill(-1, SIGKILL)`` sent *as the account* reaches every process it may signal, in
  every PID namespace; whether any remains is asked of the kernel's per-uid process count
  (``RLIMIT_NPROC``: a child switched to the uid learns how many processes of the uid exist by
  the highest soft limit under which its own ``fork`` fails). Zombies are counted by the kernel
  until reaped; they count as gone when a ``/proc`` scan before and after the count shows that
  many zombies of the uid throughout. The count is kept per user namespace and charged upwards
  to the namespace's *creator*: a process of the uid inside a user namespace that root created
  is counted for root, not for the uid. A ``/proc`` scan covers that case, except for a fast
  forker in such a namespace, which escapes both; ``kill(-1)`` as the uid still reaches it.
  The sandbox should therefore not run the uid in a user namespace created by another uid.
- files: a ``find -xdev -user UID`` walk of every local file system (one mount at a time).
- SysV IPC from ``/proc/sysvipc``; POSIX message queues from an ``mqueue`` file system mounted in
  a private mount namespace of a short-lived child; keyrings (the per-uid user and user-session
  keyrings outlive the uid's processes) read with ``keyctl`` as the uid; cron, at and systemd
  linger files by their well-known paths.

Removal (``remove_tree``) is iterative with one open directory at a time: it descends with
``openat(O_NOFOLLOW)`` and climbs back with ``openat("..")``, checking each step against the
``(st_dev, st_ino)`` it remembered, so trees of any depth go without recursion or ``PATH_MAX``.

Everything here blocks; the manager runs it in a thread. Linux only, run as root; importing it
elsewhere works (Linux-only modules are imported inside functions).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import shutil
import signal
import stat
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Who the session ran as."""

    name: str
    uid: int
    gid: int


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class WipeReport:
    processes_killed: int = 0  # kill rounds (each: SIGKILL to every process of the uid)
    files_removed: int = 0
    bytes_removed: int = 0
    details: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


CHECK_NAMES: tuple[str, ...] = (
    "processes",
    "files",
    "workspace",
    "sysv_ipc",
    "posix_mqueue",
    "keyring",
    "cron",
    "at",
    "linger",
)

SHOWN = 5  # paths or items named in a check's detail

# --- removal ------------------------------------------------------------------------------------

FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit Linux
FS_IOC_SETFLAGS = 0x40086602  # _IOW('f', 2, long)
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20

_O_DIR = (
    os.O_RDONLY
    | getattr(os, "O_DIRECTORY", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
MAX_RELIST = 20  # listings of one directory that still find new entries before giving up
DEADLINE_EVERY = 256  # entries between deadline checks


class _Abort(Exception):
    """The walk cannot go on safely (climbed into an unexpected directory, deadline)."""


def _clear_flags(name: str, dir_fd: int) -> bool:
    """Clear the immutable and append-only flags of a regular file or directory. True if any
    were cleared."""
    import fcntl

    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False
    flags_open = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(name, flags_open, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        got = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", got)[0]
        if not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            return False
        flags &= ~(FS_IMMUTABLE_FL | FS_APPEND_FL)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _clear_own_flags(fd: int) -> bool:
    import fcntl

    try:
        got = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", got)[0]
        if not flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
            return False
        fcntl.ioctl(
            fd, FS_IOC_SETFLAGS, struct.pack("i", flags & ~(FS_IMMUTABLE_FL | FS_APPEND_FL))
        )
        return True
    except OSError:
        return False


def _unlink(name: str, dir_fd: int, *, is_dir: bool) -> None:
    """unlink/rmdir ``name`` in ``dir_fd``; on EPERM clear flags of the entry and of the
    directory and try once more. FileNotFoundError means someone else removed it: fine."""
    for attempt in range(2):
        try:
            if is_dir:
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
            return
        except FileNotFoundError:
            return
        except PermissionError:
            if attempt:
                raise
            cleared = _clear_flags(name, dir_fd)
            cleared = _clear_own_flags(dir_fd) or cleared
            if not cleared:
                raise


def _open_nofollow(path: str) -> int:
    """Open an absolute directory path one component at a time, never following a symlink."""
    fd = os.open("/", _O_DIR)
    try:
        for part in Path(path).parts[1:]:
            nfd = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class _Frame:
    name: str  # in its parent
    dev: int
    ino: int
    pending: list[str] = field(default_factory=list)  # subdirectories still to visit
    skip: set[str] = field(default_factory=set)  # entries we could not remove: ignore
    listings: int = 0


def remove_tree(path: str | Path, report: WipeReport, *, deadline: float | None = None) -> bool:
    """Remove ``path`` and everything below it. Counts into ``report``; never raises.

    Iterative with at most three directory fds open, whatever the depth. Symlinks are removed,
    never followed; a directory on another file system (a mount point) is reported and left.
    ``deadline`` is a ``time.monotonic()`` value. True when ``path`` is gone."""
    path = os.path.abspath(os.fspath(path))
    if path == "/":
        report.details.append("remove_tree: refusing to remove /")
        return False
    parent, base = os.path.split(path)
    try:
        # The parent chain is resolved once (find reports real paths; a workspace root is
        # root's); from there on no symlink is followed, and ``base`` itself never is.
        pfd = _open_nofollow(os.path.realpath(parent))
    except FileNotFoundError:
        return True
    except OSError as exc:
        report.details.append(f"remove_tree {path}: cannot open parent: {exc}")
        return False
    try:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        if not stat.S_ISDIR(st.st_mode):
            _unlink(base, pfd, is_dir=False)
            report.files_removed += 1
            report.bytes_removed += st.st_size if stat.S_ISREG(st.st_mode) else 0
            return True
        mounted = _mounted_roots_under(path)
        ok = _remove_dir_contents(pfd, base, path, st, report, deadline, mounted)
        try:
            _unlink(base, pfd, is_dir=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            report.details.append(f"remove_tree {path}: {exc.strerror}")
            return False
        report.files_removed += 1
        return ok
    except _Abort as exc:
        report.details.append(f"remove_tree {path}: {exc}")
        return False
    except Exception as exc:  # a wipe never raises: it reports
        report.details.append(f"remove_tree {path}: {type(exc).__name__}: {exc}")
        return False
    finally:
        os.close(pfd)


def _open_child(parent_fd: int, name: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except PermissionError:
        # Not for root (CAP_DAC_READ_SEARCH) but for an unprivileged caller: chmod 000 dir.
        os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)
        fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    return fd, os.fstat(fd)


def _mounted_roots_under(path: str) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of what is mounted below ``path``: a bind mount of the same file system
    has the same st_dev as the tree, so the device alone does not reveal it."""
    out: set[tuple[int, int]] = set()
    prefix = path.rstrip("/") + "/"
    try:
        mounts = _mountinfo()
    except OSError:
        return out
    for point, _fstype, _opts, _sopts in mounts:
        if point.startswith(prefix):
            with contextlib.suppress(OSError):
                st = os.stat(point)
                out.add((st.st_dev, st.st_ino))
    return out


def _remove_dir_contents(
    pfd: int,
    base: str,
    shown: str,
    st: os.stat_result,
    report: WipeReport,
    deadline: float | None,
    mounted: set[tuple[int, int]],
) -> bool:
    """Empty the directory ``base`` (in ``pfd``); leaves ``base`` itself. True if emptied."""
    ok = True
    fd, fst = _open_child(pfd, base)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise _Abort("directory changed while opening it")
    root_dev = fst.st_dev
    stack = [_Frame(base, fst.st_dev, fst.st_ino)]
    seen = 0
    try:
        while stack:
            top = stack[-1]
            if not top.pending:
                if top.listings >= MAX_RELIST:
                    report.details.append(
                        f"remove_tree {shown}: entries keep appearing at depth {len(stack)}"
                    )
                    ok = False
                    top.skip.add("\0")  # mark: stop listing, climb
                else:
                    top.listings += 1
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o700)
                    found_any = False
                    with os.scandir(fd) as it:
                        for entry in it:
                            name = entry.name
                            if name in top.skip:
                                continue
                            seen += 1
                            if (
                                deadline is not None
                                and seen % DEADLINE_EVERY == 0
                                and time.monotonic() > deadline
                            ):
                                raise _Abort("deadline passed")
                            try:
                                is_dir = entry.is_dir(follow_symlinks=False)
                            except OSError:
                                is_dir = False
                            if is_dir:
                                top.pending.append(name)
                                found_any = True
                                continue
                            try:
                                est = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            except OSError:
                                est = None
                            try:
                                _unlink(name, fd, is_dir=False)
                            except IsADirectoryError:
                                top.pending.append(name)  # replaced by a directory
                                found_any = True
                                continue
                            except OSError as exc:
                                top.skip.add(name)
                                ok = False
                                report.details.append(
                                    f"remove_tree {shown}: cannot remove {name!r} at depth "
                                    f"{len(stack)}: {exc.strerror}"
                                )
                                continue
                            found_any = True
                            report.files_removed += 1
                            if est is not None and stat.S_ISREG(est.st_mode):
                                report.bytes_removed += est.st_size
                    if found_any:
                        continue  # visit the subdirectories, then list again
            if top.pending and "\0" not in top.skip:
                name = top.pending.pop()
                try:
                    cfd, cst = _open_child(fd, name)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:
                    continue  # replaced by a file: the next listing removes it
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue  # replaced by a symlink: the next listing removes it
                    top.skip.add(name)
                    ok = False
                    report.details.append(f"remove_tree {shown}: cannot open {name!r}: {exc}")
                    continue
                if cst.st_dev != root_dev or (cst.st_dev, cst.st_ino) in mounted:
                    os.close(cfd)
                    top.skip.add(name)
                    ok = False
                    report.details.append(
                        f"remove_tree {shown}: {name!r} at depth {len(stack)} is a mount point "
                        "(other file system): left in place"
                    )
                    continue
                os.close(fd)
                fd = cfd
                stack.append(_Frame(name, cst.st_dev, cst.st_ino))
                continue
            # Directory done (empty, or holding only what we could not remove): climb.
            if len(stack) == 1:
                break
            up = os.open("..", _O_DIR, dir_fd=fd)
            ust = os.fstat(up)
            parent = stack[-2]
            if (ust.st_dev, ust.st_ino) != (parent.dev, parent.ino):
                os.close(up)
                raise _Abort(f"'..' at depth {len(stack)} is not the directory we came from")
            os.close(fd)
            fd = up
            done = stack.pop()
            try:
                _unlink(done.name, fd, is_dir=True)
                report.files_removed += 1
            except OSError as exc:
                ok = False
                parent.skip.add(done.name)
                if exc.errno != errno.ENOTEMPTY:
                    report.details.append(
                        f"remove_tree {shown}: cannot remove directory {done.name!r} at depth "
                        f"{len(stack)}: {exc.strerror}"
                    )
    finally:
        os.close(fd)
    return ok


# --- running a short child as the account -------------------------------------------------------

_libc: ctypes.CDLL | None = None


def get_libc() -> ctypes.CDLL:
    # Loaded (and the modules the children use imported) in the parent: dlopen or an import in
    # a forked child of a threaded process can deadlock.
    global _libc
    if _libc is None:
        import resource  # noqa: F401

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _run_child(
    fn: Callable[[], int], account: Account | None, *, timeout: float = 10.0
) -> tuple[int, bytes]:
    """Fork a child (switched to ``account`` when given), run ``fn`` there, return its exit code
    and what it wrote to fd 1. ``fn`` ends the child with ``os._exit``; it never execs."""
    get_libc()

    def pre() -> None:
        code = 99
        try:
            code = fn()
        except BaseException:  # noqa: BLE001 - nothing may escape a forked child
            code = 98
        os._exit(code)

    proc = subprocess.run(  # noqa: S603 - fixed argv, never executed (preexec_fn exits)
        ["/bin/true"],
        preexec_fn=pre,  # noqa: PLW1509
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        timeout=timeout,
        check=False,
        user=None if account is None else account.uid,
        group=None if account is None else account.gid,
        extra_groups=None if account is None else [],
    )
    return proc.returncode, proc.stdout


def _emit(data: str) -> None:
    raw = data.encode("utf-8", "surrogateescape")
    while raw:
        n = os.write(1, raw)
        raw = raw[n:]


# --- processes ----------------------------------------------------------------------------------

NPROC_CAP = 4096  # counts above this are reported as this


def _count_in_child() -> int:
    """In a child switched to the uid: the number of *other* processes the kernel counts for
    the real uid (RLIMIT_NPROC accounting: live processes and unreaped zombies, in every PID
    namespace whose user namespace the uid's processes are charged in). Printed on fd 1."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)

    def fork_ok(limit: int) -> bool:
        # fork succeeds iff (others + me + the new child) <= limit.
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, hard))
        try:
            pid = os.fork()
        except BlockingIOError:
            return False
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return True

    if fork_ok(2):
        _emit("0")
        return 0
    lo, hi = 2, NPROC_CAP + 2  # fork fails at lo; find the smallest limit where it works
    if hard != resource.RLIM_INFINITY and hard < hi:
        hi = hard
    if not fork_ok(hi):
        _emit(str(NPROC_CAP))
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fork_ok(mid):
            hi = mid
        else:
            lo = mid
    _emit(str(hi - 2))
    return 0


def uid_process_count(account: Account) -> int:
    """Processes (and unreaped zombies) the kernel counts for the uid. -1 if the probe failed."""
    _check_account(account)
    code, out = _run_child(_count_in_child, account)
    if code != 0:
        return -1
    try:
        return int(out.decode())
    except ValueError:
        return -1


def _scan(uid: int) -> tuple[set[tuple[int, int]], list[int]]:
    """``/proc`` scan: (zombies of real uid as (pid, start time), live pids with uid as real,
    effective or saved uid). A hint only: a fast forker escapes it; the kernel count does not."""
    zombies: set[tuple[int, int]] = set()
    live: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read().decode("ascii", "replace")
            with open(f"/proc/{name}/stat", "rb") as f:
                statline = f.read().decode("ascii", "replace")
        except OSError:
            continue
        uids: list[int] = []
        state = ""
        for line in status.splitlines():
            if line.startswith("State:"):
                state = line.split()[1] if len(line.split()) > 1 else ""
            elif line.startswith("Uid:"):
                uids = [int(x) for x in line.split()[1:4]]
        if uid not in uids:
            continue
        if state in ("Z", "X"):
            if uids[0] == uid:
                fields = statline.rsplit(")", 1)[-1].split()
                start = int(fields[19]) if len(fields) > 19 else 0
                zombies.add((int(name), start))
        else:
            live.append(int(name))
    return zombies, live


def _processes_left(account: Account) -> tuple[bool, str]:
    """One look: (any process of the uid left, what was seen)."""
    count = uid_process_count(account)
    if count == 0:
        z, live = _scan(account.uid)
        if live:  # charged to another uid's user namespace: invisible to the count
            return True, f"live in /proc (not in the uid's count): pids {live[:SHOWN]}"
        return False, "none"
    if count < 0:
        return True, "process count probe failed"
    z1, live1 = _scan(account.uid)
    count = uid_process_count(account)
    z2, live2 = _scan(account.uid)
    if live1 or live2:
        return (
            True,
            f"{count} counted by the kernel; live pids {sorted(set(live1 + live2))[:SHOWN]}",
        )
    steady = z1 & z2  # zombies throughout the count: it includes at least these
    if 0 <= count <= len(steady):
        return False, f"none live ({count} unreaped zombie(s): pids {sorted(steady)[:SHOWN]})"
    return True, f"{count} counted by the kernel, {len(steady)} zombie(s) seen"


def uid_has_processes(account: Account, *, wait: float = 3.0) -> bool:
    """True if a live process of the uid exists. Kernel-counted, so a process that forks faster
    than any scan is still seen. Zombies (waiting for a slow reaper) count as gone; the answer
    True is given only after ``wait`` seconds of seeing one."""
    return _processes_verdict(account, wait=wait)[0]


def _processes_verdict(account: Account, *, wait: float = 3.0) -> tuple[bool, str]:
    end = time.monotonic() + wait
    while True:
        left, detail = _processes_left(account)
        if not left or time.monotonic() >= end:
            return left, detail
        time.sleep(0.05)


def _kill_in_child() -> int:
    for _ in range(3):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return 0  # nothing this uid may signal
        except OSError:
            return 1
    return 0


def kill_uid(account: Account, *, timeout: float = 10.0) -> int:
    """SIGKILL every process of the uid, by ``kill(-1)`` sent as the uid (no scan), until the
    kernel counts none alive or ``timeout`` passes. Returns the number of kill rounds."""
    _check_account(account)
    end = time.monotonic() + timeout
    rounds = 0
    while True:
        _run_child(_kill_in_child, account)
        rounds += 1
        left, _ = _processes_left(account)
        if not left or time.monotonic() >= end:
            return rounds
        time.sleep(0.02)


# --- files --------------------------------------------------------------------------------------

LOCAL_FS_TYPES = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "ramfs", "vfat", "msdos",
        "exfat", "ntfs", "ntfs3", "fuseblk", "zfs", "jfs", "reiserfs", "nilfs2", "bcachefs",
        "hfs", "hfsplus", "overlay", "devtmpfs", "udf", "minix",
    }
)  # fmt: skip


def _mountinfo() -> list[tuple[str, str, list[str], list[str]]]:
    """(mount point, fs type, mount options, super options) of each mount, in order."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            lf = left.split(" ")
            rf = right.split(" ")
            if len(lf) < 6 or len(rf) < 3:
                continue
            point = _unescape(lf[4])
            out.append((point, rf[0], lf[5].split(","), rf[2].split(",")))
    return out


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def local_mounts() -> list[str]:
    """Mount points of local file systems a session could have written to: local types only
    (no proc/sysfs/cgroup/devpts/mqueue, no network or FUSE file systems), not those whose
    super block is read-only (nobody can write there). Deduplicated, in mount order."""
    seen: set[str] = set()
    out: list[str] = []
    for point, fstype, _opts, sopts in _mountinfo():
        if fstype not in LOCAL_FS_TYPES or "ro" in sopts:
            continue
        if point not in seen:
            seen.add(point)
            out.append(point)
    return out


def find_owned(
    account: Account, *, roots: list[str] | None = None, limit: int = 100, timeout: float = 120.0
) -> tuple[list[str], str | None]:
    """Paths owned by the uid on each local file system (``find ROOT -xdev -user UID``, one
    root per mount). At most ``limit`` paths; the second item is an error text when the walk
    could not complete (then nothing may be concluded from an empty list)."""
    if roots is None:
        roots = local_mounts()
    find = shutil.which("find") or "/usr/bin/find"
    found: list[str] = []
    seen: set[str] = set()
    end = time.monotonic() + timeout
    for root in roots:
        if not os.path.isdir(root):
            continue
        left = end - time.monotonic()
        if left <= 0:
            return found, f"timed out after {timeout:.0f}s before {root}"
        argv = [find, root, "-xdev", "-user", str(account.uid), "-print0"]
        try:
            proc = subprocess.Popen(  # noqa: S603
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            return found, f"cannot run find: {exc}"
        try:
            out, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return found, f"find in {root} timed out after {timeout:.0f}s"
        for raw in out.split(b"\0"):
            if not raw:
                continue
            p = os.fsdecode(raw)
            if p not in seen:
                seen.add(p)
                found.append(p)
        if proc.returncode != 0:
            # Entries that vanish during the walk are fine; anything else left part unwalked.
            bad = [
                ln
                for ln in err.decode("utf-8", "replace").splitlines()
                if ln.strip() and not ln.endswith("No such file or directory")
            ]
            if bad:
                return found[:limit], f"find in {root}: {bad[0]}"
        if len(found) >= limit:
            return found[:limit], None
    return found, None


# --- SysV IPC -----------------------------------------------------------------------------------

_SYSV = (("shm", "shmid", "-m"), ("sem", "semid", "-s"), ("msg", "msqid", "-q"))


def _sysv_rows(account: Account) -> list[tuple[str, str, str]]:
    """(kind, id, row) of the uid's SysV objects in this IPC namespace."""
    rows = []
    for kind, idcol, _flag in _SYSV:
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if not lines:
            continue
        head = lines[0].split()
        try:
            iid, iuid, icuid = head.index(idcol), head.index("uid"), head.index("cuid")
        except ValueError:
            continue
        for line in lines[1:]:
            cols = line.split()
            if len(cols) <= max(iid, iuid, icuid):
                continue
            if str(account.uid) in (cols[iuid], cols[icuid]):
                rows.append((kind, cols[iid], " ".join(cols)))
    return rows


def sysv_ipc_of(account: Account) -> list[str]:
    """``/proc/sysvipc/{shm,sem,msg}`` rows whose uid or cuid is the account's."""
    return [f"{kind}: {row}" for kind, _id, row in _sysv_rows(account)]


def remove_sysv_ipc(account: Account, report: WipeReport) -> None:
    ipcrm = shutil.which("ipcrm")
    rows = _sysv_rows(account)
    if rows and ipcrm is None:
        report.details.append("sysv ipc: ipcrm (util-linux) not found, cannot remove")
        return
    flags = {kind: flag for kind, _c, flag in _SYSV}
    for kind, iid, _row in rows:
        proc = subprocess.run(  # noqa: S603
            [ipcrm or "ipcrm", flags[kind], iid], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            report.details.append(f"ipcrm {flags[kind]} {iid}: {proc.stderr.strip()}")


# --- POSIX message queues -----------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MQ_MOUNT_AT = "/tmp"  # noqa: S108 - covered only inside the child's private mount namespace


def _mq_child(uid: int, remove: bool) -> int:
    """In a root child: a private mount namespace with a fresh ``mqueue`` mount (it shows the
    queues of our IPC namespace, mounted or not on the host), list (and remove) the uid's."""
    libc = get_libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        return 10
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return 11
    if libc.mount(b"mqueue", MQ_MOUNT_AT.encode(), b"mqueue", 0, None) != 0:
        return 12
    lines = []
    for name in os.listdir(MQ_MOUNT_AT):
        try:
            st = os.lstat(f"{MQ_MOUNT_AT}/{name}")
        except OSError:
            continue
        if st.st_uid != uid:
            continue
        if remove:
            try:
                os.unlink(f"{MQ_MOUNT_AT}/{name}")
            except OSError as exc:
                lines.append(f"!{name}: {exc.strerror}")
                continue
        lines.append(f"/{name}")
    _emit("\n".join(lines))
    return 0


def _mq(account: Account, remove: bool) -> tuple[list[str], str | None]:
    uid = account.uid
    try:
        code, out = _run_child(lambda: _mq_child(uid, remove), None)
    except (OSError, subprocess.SubprocessError) as exc:
        return [], str(exc)
    if code != 0:
        return [], f"mqueue probe failed (code {code})"
    return [ln for ln in out.decode("utf-8", "surrogateescape").splitlines() if ln], None


def posix_mqueues_of(account: Account) -> list[str]:
    """POSIX message queues owned by the uid (in the agent's IPC namespace)."""
    found, err = _mq(account, remove=False)
    if err:
        return [f"cannot list: {err}"]
    return found


# --- keyrings -----------------------------------------------------------------------------------

KEYCTL_GET_KEYRING_ID = 0
KEYCTL_DESCRIBE = 6
KEYCTL_CLEAR = 7
KEYCTL_READ = 11
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5
_KEYCTL_NR = {"x86_64": 250, "aarch64": 219, "arm64": 219}


KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """A preexec step for a sandbox: a new anonymous session keyring for the session, so it does
    not inherit (and cannot write keys into) the agent's, which the next session would inherit
    too. It goes away with the session's last process."""
    _keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)


def _keyctl(*args: int) -> int:
    libc = get_libc()
    nr = _KEYCTL_NR.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, "keyctl syscall number unknown on this architecture")
    r = int(libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]))
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


KEYCTL_INVALIDATE = 21
_OWN_RINGS = ("_uid.", "_uid_ses.", "_persistent.")  # + uid: the uid's own keyrings
_PROCESS_RINGS = ("_pid", "_tid")  # die with the process that holds them


def _keyrings_child(uid: int, clear: bool) -> int:
    """In a child switched to the uid: (optionally clear, then) list what is linked in its
    user, user-session and persistent keyrings, and every other key of the uid that the
    kernel shows it in ``/proc/keys`` (a key linked in a keyring we do not know of, e.g. a
    session keyring inherited from the agent). One line per key; '!' lines are errors."""
    buf = ctypes.create_string_buffer(4096)
    rings = [("@u", KEY_SPEC_USER_KEYRING), ("@us", KEY_SPEC_USER_SESSION_KEYRING)]
    lines = []
    try:
        user_ring = _keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1)
    except OSError as exc:
        user_ring = 0
        lines.append(f"!@u: {exc.strerror}")
    try:  # created on first use (empty, owned by the uid): harmless
        rings.append(("persistent", _keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_PROCESS_KEYRING)))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            lines.append(f"!persistent: {exc.strerror}")
    for label, ring in rings:
        try:
            if clear:
                _keyctl(KEYCTL_CLEAR, ring)
            n = _keyctl(KEYCTL_READ, ring, ctypes.addressof(buf), len(buf))
        except OSError as exc:
            lines.append(f"!{label}: {exc.strerror}")
            continue
        n = min(n, len(buf))
        for (serial,) in struct.iter_unpack("i", buf.raw[: n - n % 4]):
            if serial == user_ring:
                continue  # @us links @u by default: not a key
            try:
                m = _keyctl(KEYCTL_DESCRIBE, serial, ctypes.addressof(buf), len(buf))
                desc = buf.raw[: max(0, min(m, len(buf)) - 1)].decode("utf-8", "replace")
            except OSError as exc:
                desc = f"? ({exc.strerror})"
            lines.append(f"{label}: key {serial} {desc}")
    # /proc/keys lists the keys the reader may view: as the uid, all of the uid's own keys.
    try:
        with open("/proc/keys", "rb") as f:
            proc_keys = f.read().decode("utf-8", "replace").splitlines()
    except OSError as exc:
        proc_keys = []
        lines.append(f"!/proc/keys: {exc.strerror}")
    for row in proc_keys:
        cols = row.split(None, 8)
        if len(cols) < 9 or cols[5] != str(uid):
            continue
        ktype, desc = cols[7], cols[8].split(":", 1)[0]
        if ktype == "keyring" and (
            desc in tuple(p + str(uid) for p in _OWN_RINGS) or desc in _PROCESS_RINGS
        ):
            continue
        if clear:
            with contextlib.suppress(OSError, ValueError):
                _keyctl(KEYCTL_INVALIDATE, int(cols[0], 16))
                continue
        lines.append(f"key {cols[0]} {ktype} {desc!r} (in /proc/keys)")
    _emit("".join(line + "\n" for line in lines))
    return 0


def _keyrings(account: Account, clear: bool) -> list[str]:
    uid = account.uid
    code, out = _run_child(lambda: _keyrings_child(uid, clear), account)
    lines = [ln for ln in out.decode("utf-8", "replace").splitlines() if ln]
    if code != 0:
        lines.append(f"!keyring probe failed (code {code})")
    return lines


def clear_keyrings(account: Account) -> None:
    """Clear the uid's user, user-session and persistent keyrings (they outlive its
    processes: a later session under the same uid would read them) and invalidate any other
    key of the uid the kernel still shows it."""
    _check_account(account)
    _keyrings(account, clear=True)


def keyrings_of(account: Account, *, gc_wait: float = 2.0) -> list[str]:
    """Keys still linked in the uid's user / user-session / persistent keyrings, and any
    other key of the uid (``/proc/keys`` read as the uid). Keys of just-ended processes wait
    for the kernel's key garbage collector, so a non-empty answer is re-read for ``gc_wait``
    seconds. Empty: clean."""
    _check_account(account)
    end = time.monotonic() + gc_wait
    while True:
        lines = _keyrings(account, clear=False)
        if not lines or time.monotonic() >= end:
            return lines
        time.sleep(0.1)


# --- cron, at, linger ---------------------------------------------------------------------------

CRONTAB_DIRS = ("/var/spool/cron/crontabs", "/var/spool/cron")
AT_DIRS = ("/var/spool/cron/atjobs", "/var/spool/cron/atspool", "/var/spool/at")
LINGER_DIR = "/var/lib/systemd/linger"


def crontabs_of(account: Account) -> list[str]:
    out = []
    for d in CRONTAB_DIRS:
        p = os.path.join(d, account.name)
        with contextlib.suppress(OSError):
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                out.append(p)
    return out


def _owned_below(d: str, uid: int, depth: int = 2) -> list[str]:
    out: list[str] = []
    todo = [(d, 0)]
    while todo:
        cur, level = todo.pop()
        try:
            entries = list(os.scandir(cur))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                out.append(e.path)
            elif stat.S_ISDIR(st.st_mode) and level + 1 < depth:
                todo.append((e.path, level + 1))
    return out


def at_jobs_of(account: Account) -> list[str]:
    out: list[str] = []
    for d in AT_DIRS:
        out += _owned_below(d, account.uid)
    return out


def cron_at_jobs_of(account: Account) -> list[str]:
    """The account's crontab (Debian and RHEL paths) and at jobs (files it owns in the at
    spool directories)."""
    return crontabs_of(account) + at_jobs_of(account)


def remove_cron_at(account: Account, report: WipeReport | None = None) -> None:
    rep = report if report is not None else WipeReport()
    for p in cron_at_jobs_of(account):
        remove_tree(p, rep)


def linger_of(account: Account) -> list[str]:
    p = os.path.join(LINGER_DIR, account.name)
    return [p] if os.path.lexists(p) else []


# --- the whole wipe -----------------------------------------------------------------------------


def _check_account(account: Account) -> None:
    if account.uid <= 0 or account.uid == os.getuid() or account.gid <= 0:
        raise ValueError(f"refusing to wipe account {account.name} (uid {account.uid})")


def _step(report: WipeReport, what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a wipe never raises: it reports
        report.details.append(f"{what}: {type(exc).__name__}: {exc}")


def wipe_account(
    account: Account, report: WipeReport, *, workspace: str | Path | None = None
) -> None:
    """Remove everything of ``account`` from the host, then prove it: ``report.checks`` holds
    every check. Never raises; a failed step shows in ``report.details`` and in the checks."""
    try:
        _check_account(account)
    except ValueError as exc:
        report.details.append(str(exc))
        report.checks = [Check(n, False, "refused: unsafe account") for n in CHECK_NAMES]
        return

    counted: list[int] = []

    def kill() -> None:
        # The receipt's count: what the kernel counts for the uid before the first kill (later
        # counts would include the zombies of this kill).
        if not counted:
            counted.append(max(0, uid_process_count(account)))
            report.processes_killed += counted[0]
        kill_uid(account)

    _step(report, "kill", kill)
    # Jobs first, then kill again: a job that started meanwhile ends too.
    _step(report, "cron/at", lambda: remove_cron_at(account, report))
    _step(report, "linger", lambda: [remove_tree(p, report) for p in linger_of(account)])
    _step(report, "kill", kill)
    if workspace is not None:
        _step(report, "workspace", lambda: remove_tree(workspace, report))
    _step(report, "sysv ipc", lambda: remove_sysv_ipc(account, report))

    def mq() -> None:
        _found, err = _mq(account, remove=True)
        if err:
            report.details.append(f"posix mqueue: {err}")

    _step(report, "posix mqueue", mq)
    _step(report, "keyring", lambda: clear_keyrings(account))

    clean_walk: list[bool] = []

    def files() -> None:
        # Walk again only when the last walk may have stopped at its limit or a removal
        # failed. A complete walk that found nothing, with no process of the uid left to
        # write, is the proof: prove_clean need not walk again.
        for _ in range(5):
            paths, err = find_owned(account, limit=FIND_BATCH)
            if err:
                report.details.append(f"files: {err}")
            elif not paths:
                clean_walk.append(True)
                return
            removed = [remove_tree(p, report, deadline=time.monotonic() + 60) for p in paths]
            if len(paths) < FIND_BATCH and all(removed):
                return

    _step(report, "files", files)
    try:
        report.checks = prove_clean(account, workspace=workspace, files_walked=bool(clean_walk))
    except Exception as exc:  # noqa: BLE001
        report.details.append(f"prove_clean: {type(exc).__name__}: {exc}")
        report.checks = [Check("prove_clean", False, str(exc))]


FIND_BATCH = 1000


def _listed(items: list[str]) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def prove_clean(
    account: Account,
    *,
    workspace: str | Path | None = None,
    process_wait: float = 3.0,
    files_walked: bool = False,
    quick: bool = False,
) -> list[Check]:
    """Every check, named, with what it found. All ok: nothing of the account is left.
    ``process_wait``: how long a process of the uid may take to go (zombies being reaped).
    ``files_walked``: the caller's own complete walk found no file of the uid, after every
    process of it was gone; the "files" check then trusts it (provided no process of the uid
    exists now, which the "processes" check proves first).
    ``quick``: only the checks that cost milliseconds (no file walk, no workspace): before an
    account is handed out."""
    checks: list[Check] = []

    def check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001 - a check that cannot run fails
            ok, detail = False, f"check failed: {type(exc).__name__}: {exc}"
        checks.append(Check(name, ok, detail))

    def processes() -> tuple[bool, str]:
        left, detail = _processes_verdict(account, wait=process_wait)
        return not left, detail

    def files() -> tuple[bool, str]:
        if files_walked and checks and checks[0].name == "processes" and checks[0].ok:
            return True, "none (one complete walk of every local file system)"
        paths, err = find_owned(account, limit=SHOWN + 1)
        if err:
            return False, f"walk incomplete: {err}; found {_listed(paths)}"
        return not paths, _listed(paths)

    def ws() -> tuple[bool, str]:
        if workspace is None:
            return True, "none given"
        gone = not os.path.lexists(workspace)
        return gone, "gone" if gone else f"{workspace} still exists"

    def sysv() -> tuple[bool, str]:
        rows = sysv_ipc_of(account)
        return not rows, _listed(rows)

    def mq() -> tuple[bool, str]:
        found, err = _mq(account, remove=False)
        if err:
            return False, f"cannot list: {err}"
        return not found, _listed(found)

    def keyring() -> tuple[bool, str]:
        lines = keyrings_of(account)
        return not lines, _listed(lines)

    def cron() -> tuple[bool, str]:
        found = crontabs_of(account)
        return not found, _listed(found)

    def at() -> tuple[bool, str]:
        found = at_jobs_of(account)
        return not found, _listed(found)

    def linger() -> tuple[bool, str]:
        found = linger_of(account)
        return not found, _listed(found)

    _check_account(account)
    for name, fn in zip(
        CHECK_NAMES, (processes, files, ws, sysv, mq, keyring, cron, at, linger), strict=True
    ):
        if not (quick and name in ("files", "workspace")):
            check(name, fn)
    return checks
