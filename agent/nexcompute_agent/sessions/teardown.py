"""Ending a session for good and the proof: the sandbox's namespace and cgroup ended, the
workspace removed, the account ended and proved clean by :mod:`.wiper`; the receipt. Blocking
functions (the manager runs them in a thread); none of them raises for what it finds: problems
become failed checks, and a failed check an unverified receipt."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from nexcompute_agent.protocol import MAX_INT32, SessionReceipt, WipeCheck
from nexcompute_agent.sessions import cleanup, sandbox, wiper
from nexcompute_agent.sessions.accounts import PoolError, lookup
from nexcompute_agent.sessions.jupyter import reap
from nexcompute_agent.sessions.wiper import Account, Check, WipeReport

if TYPE_CHECKING:
    from nexcompute_agent.sessions.state import SessionRecord

MAX_DETAILS = 200


def wipe_sandboxed(
    record: SessionRecord,
    report: WipeReport,
    *,
    cgroups: sandbox.Cgroups | None = None,
    workspace: sandbox.Workspace | None = None,
    counted: set[int] | None = None,
    init: tuple[int | None, float | None] = (None, None),
) -> None:
    """Blocking. The sandbox's PID namespace and cgroup end everything of it; the image goes
    with every file; then the wiper ends and proves the account. What the running session knew
    (its cgroups, workspace, the processes counted before the stop, its init) is passed in;
    after a crash all of it is found again from the record."""
    sid = record.session_id
    cgroups = cgroups or sandbox.Cgroups.existing(record.cgroup_id or sid)
    init_pid = record.init_pid or init[0]
    init_ct = record.init_create_time or init[1]
    counted = set(counted or ()) | _sandbox_processes(init_pid, init_ct)
    counted |= set(cgroups.procs())
    ended = sandbox.end_namespace(init_pid, init_ct)
    # What we started outside the namespace: bwrap's outer process (it reaps the init and
    # exits by itself once the init is gone) and cloudflared.
    outer = cleanup.recorded_processes([p for p in record.procs if p.role == "sandbox"])
    others = cleanup.recorded_processes([p for p in record.procs if p.role != "sandbox"])
    for proc in others:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(outer + others, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=2)
    cgroups.kill()
    gone = _wait_gone(init_pid, init_ct, timeout=10.0)
    reap(init_pid)  # a zombie init holds the session's credentials and keyring
    report.checks.append(Check(
        "sandbox", gone,
        ("PID namespace ended" if ended else "PID namespace already gone") if gone
        else f"the sandbox's init {init_pid} is still running",
    ))  # fmt: skip
    cg_removed = cgroups.remove()
    report.details.extend(cgroups.details)
    report.checks.append(Check(
        "cgroup", cg_removed, "removed" if cg_removed else "; ".join(cgroups.details)
    ))  # fmt: skip
    report.processes_killed = len(counted)
    workspace = workspace or sandbox.Workspace.existing(Path(record.workspace))
    inodes, size, problems = workspace.destroy()
    report.files_removed += inodes
    report.bytes_removed += size
    report.details.extend(problems)
    report.checks.append(_image_check(workspace))
    try:
        account = lookup(record.user or "")
    except PoolError as exc:
        report.checks.append(Check("account", False, str(exc)))
        return
    killed_before, ours = report.processes_killed, list(report.checks)
    wiper.wipe_account(account, report, workspace=record.workspace)
    report.checks[:0] = ours  # the wiper's proof follows the sandbox's own checks
    # The wiper counts what it had to kill outside the sandbox; add, never replace.
    report.processes_killed = max(report.processes_killed, killed_before)


def wipe_unprivileged(record: SessionRecord, report: WipeReport) -> None:
    """The agent's own user ran the session: its recorded processes and their descendants,
    and any process carrying the session marker; then the workspace."""
    seen: set[tuple[int, float]] = set()

    def find() -> list[psutil.Process]:
        found = cleanup.recorded_processes(record.procs)
        found += cleanup.marked_processes(record.session_id)
        return list({p.pid: p for p in found}.values())

    survivors = cleanup.kill_all(find, seen)
    report.processes_killed = len(seen)
    wiper.remove_tree(record.workspace, report)
    ws = Path(record.workspace)
    left = survivors or find()
    report.checks.append(Check(
        "processes", not left,
        "none" if not left else "left: " + ", ".join(str(p.pid) for p in left[:20]),
    ))  # fmt: skip
    exists = ws.exists() or ws.is_symlink()
    report.checks.append(
        Check("workspace", not exists, f"{ws} still exists" if exists else "removed")
    )
    report.details.append("scope: the session's own processes and its workspace")


def wipe_orphan(
    record: SessionRecord,
    report: WipeReport,
    accounts: list[str],
    results: dict[str, tuple[bool, str]],
) -> None:
    """Blocking. A session with no record (a stop after a lost start, leftovers at start-up):
    its cgroup and workspace, and the free ``accounts`` of the pool (held out of the pool by the
    caller meanwhile): each that is not clean is wiped; ``results`` says per account whether it
    is clean now (and why not)."""
    sid = record.session_id
    cgroups = sandbox.Cgroups.existing(sid)
    report.processes_killed = len(cgroups.procs())
    removed = cgroups.remove()
    report.checks.append(
        Check("cgroup", removed, "removed" if removed else "; ".join(cgroups.details))
    )
    workspace = sandbox.Workspace.existing(Path(record.workspace))
    inodes, size, problems = workspace.destroy()
    report.files_removed, report.bytes_removed = inodes, size
    report.details.extend(problems)
    report.checks.append(_image_check(workspace))
    ws = Path(record.workspace)
    if ws.exists() or ws.is_symlink():
        wiper.remove_tree(ws, report)
    exists = ws.exists() or ws.is_symlink()
    report.checks.append(Check("workspace", not exists, "still exists" if exists else "none"))
    check_accounts(accounts, report, results)


def check_accounts(
    names: list[str], report: WipeReport, results: dict[str, tuple[bool, str]]
) -> None:
    """Blocking. The cheap checks on each account; one that holds anything is wiped (and its
    wipe counted into ``report``). ``results``: per account, whether it is clean now, and why
    not. An account that does not exist here is left as it is (a start then says so)."""
    for name in names:
        try:
            account = lookup(name)
        except PoolError:
            results[name] = (True, "")
            continue
        if all(c.ok for c in quick_checks(account)):
            results[name] = (True, "")
            continue
        sub = WipeReport()
        wiper.wipe_account(account, sub)
        report.processes_killed += sub.processes_killed
        report.files_removed += sub.files_removed
        ok = sub.verified
        results[name] = (ok, failed_text(sub))
        report.checks.append(Check(
            f"account {name}", ok, "leftovers found and wiped" if ok else failed_text(sub),
        ))  # fmt: skip


def quick_checks(account: Account) -> list[Check]:
    """The checks of :func:`wiper.prove_clean` that cost milliseconds (all but the walk of
    every local file system)."""
    return wiper.prove_clean(account, quick=True, process_wait=1.0)


def receipt(
    record: SessionRecord, report: WipeReport, duration: float, *, account: str | None
) -> SessionReceipt:
    return SessionReceipt(
        session_id=record.session_id,
        verified=report.verified,
        files_removed=report.files_removed,
        bytes_removed=report.bytes_removed,
        processes_killed=min(report.processes_killed, MAX_INT32),
        duration_seconds=duration,
        details=[d[:4000] for d in report.details[:MAX_DETAILS]],
        checks=[
            WipeCheck(name=c.name[:256], ok=c.ok, detail=c.detail[:4000])
            for c in report.checks[:64]
        ],
        account=account,
    )


def failed_text(report: WipeReport) -> str:
    return "; ".join(f"{c.name}: {c.detail}" for c in report.checks if not c.ok)[:500]


def _image_check(workspace: sandbox.Workspace) -> Check:
    """The workspace image (every file of the session) is deleted and no longer mounted."""
    left = []
    if workspace.image is not None and os.path.lexists(workspace.image):
        left.append(f"image {workspace.image} still exists")
    if os.path.ismount(workspace.path):
        left.append(f"{workspace.path} is still mounted")
    return Check("workspace_image", not left, "; ".join(left) or "deleted")


def _sandbox_processes(init_pid: int | None, create_time: float | None) -> set[int]:
    """The sandbox's processes, for the receipt's count (the kill does not rely on it)."""
    if init_pid is None:
        return set()
    try:
        init = psutil.Process(init_pid)
        if create_time is not None and abs(init.create_time() - create_time) > 0.05:
            return set()
        return {p.pid for p in init.children(recursive=True)}
    except psutil.Error:
        return set()


def _wait_gone(pid: int | None, create_time: float | None, *, timeout: float) -> bool:
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc = psutil.Process(pid)
            same = create_time is None or abs(proc.create_time() - create_time) <= 0.05
            if not same or proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
