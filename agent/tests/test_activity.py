"""The idle rule's activity computation (docs/policy.md, "Idle"): the pure combination of the
readings, and the readings themselves from real processes (a CPU loop, a real pty)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest

from nexcompute_agent.probe import GpuProbe
from nexcompute_agent.protocol import SessionActivity, dump_for, parse_agent_message
from nexcompute_agent.sessions.activity import (
    ActivityTracker,
    CpuWindow,
    Readings,
    kernel_readings,
    lab_interaction,
    parse_time,
    read_processes,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

T0 = 1_800_000_000.0


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def tracker(**kw: float) -> ActivityTracker:
    return ActivityTracker(
        started_at=kw.get("started_at", T0),
        cpu_percent=kw.get("cpu_percent", 10.0),
        cpu_window=kw.get("cpu_window", 300.0),
    )


# --- parsing Jupyter's and the extension's answers ---------------------------------------------


def test_it_reads_jupyters_utc_times_and_refuses_naive_or_odd_ones() -> None:
    assert parse_time("2027-01-15T08:00:00.123456Z") == pytest.approx(
        dt.datetime(2027, 1, 15, 8, 0, 0, 123456, dt.UTC).timestamp()
    )
    assert parse_time("2027-01-15T09:00:00+01:00") == parse_time("2027-01-15T08:00:00Z")
    for bad in ("2027-01-15T08:00:00", "yesterday", "", None, 3, "9" * 100, ["x"]):
        assert parse_time(bad) is None


def test_it_counts_busy_kernels_and_takes_the_latest_kernel_activity() -> None:
    kernels = [
        {"id": "a", "execution_state": "idle", "last_activity": iso(T0 + 5)},
        {"id": "b", "execution_state": "busy", "last_activity": iso(T0 + 2)},
        {"id": "c", "execution_state": "busy", "last_activity": "garbage"},
        "not a kernel",
    ]
    assert kernel_readings(kernels) == (2, T0 + 5)
    assert kernel_readings([]) == (0, None)
    assert kernel_readings({"kernels": []}) == (0, None)


def test_the_lab_extension_is_optional_and_never_trusted_blindly() -> None:
    assert lab_interaction(200, json.dumps({"last_interaction": iso(T0)}).encode()) == T0
    assert lab_interaction(200, b'{"last_interaction": null}') is None
    assert lab_interaction(404, b'{"last_interaction": "2027-01-01T00:00:00Z"}') is None
    assert lab_interaction(200, b"<html>not json") is None
    assert lab_interaction(200, b"[1, 2]") is None
    assert lab_interaction(200, b"[" * 100_000) is None  # deep nesting: no RecursionError
    assert lab_interaction(200, b'{"last_interaction": "2027-01-01T00:00:00"}') is None


# --- the rule ------------------------------------------------------------------------------


def test_an_untouched_session_is_idle_since_its_start() -> None:
    t = tracker()
    for i in range(5):
        # Jupyter's own /api/status clock is not an input at all; an idle kernel started at
        # the start, no terminal input, no interaction, no CPU.
        v = t.update(Readings(now=T0 + 60 * i, kernel_last=T0, cpu_seconds=0.2))
        assert (v.last_activity, v.source) == (T0, "start")
    assert v.cpu_percent == 0.0


def test_a_busy_kernel_is_active_now_and_an_idle_one_at_its_last_activity() -> None:
    t = tracker()
    v = t.update(Readings(now=T0 + 600, kernels_busy=1, kernel_last=T0 + 10))
    assert (v.last_activity, v.source) == (T0 + 600, "kernel")
    v = t.update(Readings(now=T0 + 660, kernels_busy=0, kernel_last=T0 + 630))
    assert (v.last_activity, v.source) == (T0 + 630, "kernel")


def test_terminal_input_and_lab_interaction_count_and_the_latest_wins() -> None:
    t = tracker()
    v = t.update(Readings(now=T0 + 100, terminal_input=T0 + 90, lab_interaction=T0 + 80))
    assert (v.last_activity, v.source) == (T0 + 90, "terminal")
    v = t.update(Readings(now=T0 + 200, terminal_input=T0 + 90, lab_interaction=T0 + 150))
    assert (v.last_activity, v.source) == (T0 + 150, "lab")


def test_nothing_counts_from_the_future() -> None:
    v = tracker().update(Readings(now=T0 + 10, lab_interaction=T0 + 10_000))
    assert (v.last_activity, v.source) == (T0 + 10, "lab")


def test_cpu_above_the_threshold_over_the_window_is_activity_and_below_is_not() -> None:
    t = tracker(cpu_percent=10.0, cpu_window=120.0)
    cpu = 0.0
    v = t.update(Readings(now=T0 + 60, cpu_seconds=cpu))
    assert v.cpu_percent is None and v.source == "start"  # one sample: no rate yet
    # 5 % of a core (an idle kernel, a slow poller): not activity.
    for i in range(2, 6):
        cpu += 3.0
        v = t.update(Readings(now=T0 + 60 * i, cpu_seconds=cpu))
        assert v.cpu_percent == pytest.approx(5.0)
        assert v.source == "start"
    # A training run at a full core: active at every report.
    for i in range(6, 12):
        cpu += 60.0
        v = t.update(Readings(now=T0 + 60 * i, cpu_seconds=cpu))
        assert (v.last_activity, v.source) == (T0 + 60 * i, "cpu")
    # It ends: the window still averages above the threshold for a while, then the session is
    # idle since the last report that saw the work.
    seen = []
    for i in range(12, 18):
        v = t.update(Readings(now=T0 + 60 * i, cpu_seconds=cpu))
        seen.append((i, v.last_activity, round(v.cpu_percent or 0)))
    assert seen[0] == (12, T0 + 720, 50)  # (60 s busy of the last 120 s)
    assert seen[1] == (13, T0 + 720, 0)
    assert all(last == T0 + 720 for _, last, _ in seen[1:])


def test_a_session_process_on_a_busy_gpu_is_activity() -> None:
    t = tracker()
    v = t.update(Readings(now=T0 + 100, gpu_busy=False, cpu_seconds=0.0))
    assert v.source == "start"
    v = t.update(Readings(now=T0 + 200, gpu_busy=True, cpu_seconds=0.1))
    assert (v.last_activity, v.source) == (T0 + 200, "gpu")
    v = t.update(Readings(now=T0 + 300, gpu_busy=None, cpu_seconds=0.2))  # the tool failed
    assert (v.last_activity, v.source) == (T0 + 200, "gpu")


def test_gpu_users_come_from_nvidia_smi(
    tests_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEXCOMPUTE_NVIDIA_SMI", str(tests_dir / "bin" / "fake-nvidia-smi"))
    monkeypatch.setenv("FAKE_GPU_BUSY_PIDS", "123 456")
    monkeypatch.setenv("FAKE_GPU_IDLE_PIDS", "789")
    probe = GpuProbe()
    # GPU-busy is at 40 %, GPU-idle at 3 %, GPU-old says [N/A].
    assert probe.busy_pids(10.0) == {123, 456}
    assert probe.busy_pids(50.0) == set()
    assert probe.busy_pids(0.0) == {123, 456, 789}
    monkeypatch.setenv("NEXCOMPUTE_NVIDIA_SMI", str(tmp_path / "no-such-nvidia-smi"))
    assert GpuProbe().busy_pids(10.0) is None  # no GPU tool: unknown, not "idle"


def test_a_falling_cpu_counter_is_no_negative_use() -> None:
    w = CpuWindow(60.0)
    assert w.add(T0, 100.0) is None
    assert w.add(T0 + 10, 110.0) == pytest.approx(100.0)
    # A process with 80 s of CPU left the sum (reaped by something outside the session).
    assert w.add(T0 + 20, 30.0) == pytest.approx(50.0)
    assert w.add(T0 + 30, 35.0) == pytest.approx(100 * 15 / 30)


def test_the_report_carries_the_new_fields_only_to_a_peer_that_knows_them() -> None:
    msg = SessionActivity(
        session_id=4, last_activity=dt.datetime.fromtimestamp(T0, dt.UTC), kernels_busy=0,
        connections=1, source="cpu", cpu_percent=97.5,
    )  # fmt: skip
    assert parse_agent_message(msg.model_dump_json()) == msg
    old = json.loads(dump_for(msg, 2, set()))
    assert "source" not in old and "cpu_percent" not in old
    # A protocol-2 agent's report (no source, no cpu_percent) is still read.
    v2 = parse_agent_message(json.dumps(old))
    assert isinstance(v2, SessionActivity) and v2.source is None and v2.cpu_percent is None
    bad = {**json.loads(msg.model_dump_json()), "source": "tab_open"}
    with pytest.raises(Exception, match="source"):
        parse_agent_message(json.dumps(bad))


# --- readings from real processes ----------------------------------------------------------


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(timeout=10)


def wait_for(cond, timeout: float = 15.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_it_measures_a_cpu_loop_but_not_the_excluded_server(
    children: list[subprocess.Popen[bytes]],
) -> None:
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    children.append(loop)
    sleeper = subprocess.Popen(["sleep", "60"])
    children.append(sleeper)
    procs = [psutil.Process(loop.pid), psutil.Process(sleeper.pid)]
    first = read_processes(procs, exclude=set())
    assert first.count == 2
    # The loop really runs: its CPU time grows.
    wait_for(lambda: read_processes(procs, exclude=set()).cpu_seconds >= first.cpu_seconds + 0.3)
    # Excluded (Jupyter's own work): its time is not the student's.
    excluded = read_processes(procs, exclude={loop.pid})
    assert excluded.cpu_seconds < 0.1
    assert excluded.count == 2


def test_terminal_input_moves_the_ptys_clock_and_output_does_not(
    children: list[subprocess.Popen[bytes]],
) -> None:
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    # A program that only prints to the terminal (a training run's progress bar).
    printer = subprocess.Popen(
        ["sh", "-c", "while :; do echo step; sleep 0.1; done"],
        stdin=slave, stdout=slave, stderr=slave,
    )  # fmt: skip
    children.append(printer)
    old = time.time() - 1000
    os.utime(path, (old, old))
    procs = [psutil.Process(printer.pid)]
    # Output really flows (the master reads it), and the pty's clock stays where it was.
    got = b""
    while got.count(b"step") < 3:
        got += os.read(master, 1024)
    assert Path(path).stat().st_mtime > old + 900  # output moves the modification time...
    assert read_processes(procs, exclude=set()).terminal_input == pytest.approx(old)
    printer.kill()
    printer.wait()
    children.remove(printer)

    # A program that reads input from the terminal (a shell at its prompt).
    reader = subprocess.Popen(["head", "-n", "1"], stdin=slave, stdout=subprocess.PIPE)
    children.append(reader)
    os.utime(path, (old, old))
    procs = [psutil.Process(reader.pid)]
    assert read_processes(procs, exclude=set()).terminal_input == pytest.approx(old)
    before = time.time()
    os.write(master, b"typed\n")
    out, _ = reader.communicate(timeout=10)
    assert out == b"typed\n"  # the input was read
    # head has exited; the pty's clock is on the inode, which any holder shows.
    holder = subprocess.Popen(["sleep", "60"], stdin=slave)
    children.append(holder)
    at = read_processes([psutil.Process(holder.pid)], exclude=set()).terminal_input
    assert at is not None and before - 8 <= at <= time.time()
    os.close(master)
    os.close(slave)
