"""What counts as a session's activity, for the server's idle rule (docs/policy.md, "Idle").

A session is active when someone or something is working in it:

- a kernel executing: busy now, or its own last activity (jupyter_server moves a kernel's
  ``last_activity`` on its messages while it executes and on requests such as completions, not
  on the frontend's housekeeping: ``kernel_info``, ``comm_info``, ``status``);
- input in a terminal: the terminal's pty was last *read* from (the kernel sets a tty's access
  time when a process reads input from it, and its modification time on output, the same clock
  ``w`` shows as IDLE), so a terminal merely printing is judged by its CPU, not its output;
- the student's own interaction in Lab (key presses, clicks), as the session's Lab extension
  reports it at ``GET /nexcompute/api/activity`` (absent without the extension);
- the session's processes using CPU above a threshold (percent of one core, averaged over a
  window of the last minutes): a training run under ``nohup`` is working;
- a process of the session holding a compute context on a GPU that is busy above a threshold
  (where NVML or nvidia-smi can tell).

Not activity: an open, untouched tab, the frontend's own polling (``/api/kernels``,
``/api/sessions``, contents), open connections, and Jupyter's own ``/api/status``
``last_activity``, which all of those move. The session's start is the floor: a session nobody
used is idle since it started.

Pure computation (:class:`ActivityTracker`) is kept apart from the readings that block
(:func:`read_processes`, run in a thread) so that the rule is tested without processes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import stat
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import psutil

if TYPE_CHECKING:
    from collections.abc import Iterable

Source = Literal["kernel", "terminal", "lab", "cpu", "gpu", "start"]

# Unix98 pty slaves (/dev/pts/N) have majors 136-143 (Documentation/admin-guide/devices.txt).
PTY_SLAVE_MAJORS = range(136, 144)
# The kernel records a tty's times only to 8 s (tty_update_time masks the low three bits of
# the seconds): terminal input is known to within 8 s, well inside any idle limit.
TTY_TIME_GRANULARITY = 8.0


def parse_time(value: object) -> float | None:
    """An ISO 8601 time with a zone (jupyter_server writes UTC with ``Z``) as a POSIX
    timestamp; None for anything else (never guessed)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def kernel_readings(kernels: object) -> tuple[int, float | None]:
    """From ``/api/kernels``: how many kernels are busy, and the latest kernel activity."""
    if not isinstance(kernels, list):
        return 0, None
    busy, latest = 0, None
    for k in kernels:
        if not isinstance(k, dict):
            continue
        if k.get("execution_state") == "busy":
            busy += 1
        at = parse_time(k.get("last_activity"))
        if at is not None and (latest is None or at > latest):
            latest = at
    return busy, latest


def lab_interaction(status: int, body: bytes) -> float | None:
    """From the Lab extension's ``GET /nexcompute/api/activity``: the student's last
    interaction, or None (no extension: 404; no interaction yet; anything unreadable)."""
    if status != 200:
        return None
    import json

    try:
        data: Any = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return parse_time(data.get("last_interaction"))


@dataclass(frozen=True)
class ProcessReadings:
    """One look at the session's processes (:func:`read_processes`)."""

    cpu_seconds: float  # user + system of the processes, and of their reaped children
    terminal_input: float | None  # latest access time of a pty the processes hold
    count: int


def read_processes(procs: Iterable[psutil.Process], *, exclude: set[int]) -> ProcessReadings:
    """CPU time and terminal input of ``procs``. ``exclude``: pids whose *own* CPU is not the
    student's work (Jupyter itself, which the open tab's polling keeps busy); their reaped
    children (a kernel that was shut down) still count. Blocks (reads /proc)."""
    cpu, tty, n = 0.0, None, 0
    for p in procs:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        n += 1
        cpu += times.children_user + times.children_system
        if p.pid not in exclude:
            cpu += times.user + times.system
        for fd in (0, 1, 2):
            # stat() through /proc/PID/fd reaches the pty inside the sandbox's own devpts.
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{p.pid}/fd/{fd}")
                if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTY_SLAVE_MAJORS:
                    tty = st.st_atime if tty is None else max(tty, st.st_atime)
    return ProcessReadings(cpu_seconds=cpu, terminal_input=tty, count=n)


@dataclass(frozen=True)
class Readings:
    """Everything one report looks at. Times are POSIX timestamps; None is "not known"."""

    now: float
    kernels_busy: int = 0
    kernel_last: float | None = None
    terminal_input: float | None = None
    lab_interaction: float | None = None
    cpu_seconds: float | None = None
    gpu_busy: bool | None = None  # a session process on a busy GPU; None: no GPU tool


@dataclass(frozen=True)
class Verdict:
    last_activity: float
    source: Source
    cpu_percent: float | None  # over the window, percent of one core; None until measured


class CpuWindow:
    """CPU use averaged over the last ``window`` seconds, from a cumulative counter sampled at
    each report. The counter is made monotonic here: a process whose time leaves the sum (reaped
    by something outside the session) is no negative use."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.total = 0.0
        self._last_raw: float | None = None
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, raw_seconds: float) -> float | None:
        """Add a sample; return the percent of one core over the window (or over the time
        since the first sample, while that is shorter), None before there are two samples."""
        if self._last_raw is not None:
            self.total += max(0.0, raw_seconds - self._last_raw)
        self._last_raw = raw_seconds
        self._samples.append((now, self.total))
        # Keep one sample at or before the window's start, as the base of the average.
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        t0, c0 = self._samples[0]
        if now - t0 <= 0:
            return None
        return 100.0 * (self.total - c0) / (now - t0)


class ActivityTracker:
    """One running session's activity: combines each report's :class:`Readings` into the
    latest moment of activity and what it was."""

    def __init__(self, *, started_at: float, cpu_percent: float, cpu_window: float) -> None:
        self.started_at = started_at
        self.threshold = cpu_percent
        self.cpu = CpuWindow(cpu_window)
        self.cpu_active_at: float | None = None
        self.gpu_active_at: float | None = None

    def update(self, r: Readings) -> Verdict:
        percent = None
        if r.cpu_seconds is not None:
            percent = self.cpu.add(r.now, r.cpu_seconds)
            if percent is not None and percent >= self.threshold:
                self.cpu_active_at = r.now
        if r.gpu_busy:
            self.gpu_active_at = r.now
        candidates: list[tuple[float | None, Source]] = [
            (self.started_at, "start"),
            (r.now if r.kernels_busy > 0 else r.kernel_last, "kernel"),
            (r.terminal_input, "terminal"),
            (r.lab_interaction, "lab"),
            (self.cpu_active_at, "cpu"),
            (self.gpu_active_at, "gpu"),
        ]
        # Nothing from the future (a clock that jumped, a client's odd time): at most now.
        known = [(min(at, r.now), src) for at, src in candidates if at is not None]
        at, source = max(known, key=lambda c: c[0])
        return Verdict(last_activity=at, source=source, cpu_percent=percent)
