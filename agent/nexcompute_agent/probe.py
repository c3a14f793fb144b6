"""Host specs and metrics, reported in ``hello`` and every ``heartbeat``.

GPUs come from NVML (``pip install nexcompute-agent[gpu]``) when it loads, else from
``nvidia-smi`` when it is on PATH, else there are none. ``NEXCOMPUTE_NVIDIA_SMI`` (or the config
key ``nvidia_smi``) names another nvidia-smi; setting the environment variable also skips NVML,
so a stand-in script can be tested on any machine.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from nexcompute_agent.protocol import MAX_STR, Gpu, Metrics, Specs

log = logging.getLogger(__name__)

NVIDIA_SMI_ENV = "NEXCOMPUTE_NVIDIA_SMI"
NVIDIA_SMI_TIMEOUT = 5.0
_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    name: str
    memory_bytes: int
    utilization_percent: float | None
    memory_used_bytes: int | None


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()[:MAX_STR]
    return (platform.processor() or platform.machine() or "unknown")[:MAX_STR]


def os_description() -> str:
    """E.g. ``Linux 6.1.0-18-amd64 (Debian GNU/Linux 12 (bookworm))``."""
    text = f"{platform.system()} {platform.release()}".strip()
    pretty = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(errors="replace").splitlines():
            if line.startswith("PRETTY_NAME="):
                pretty = line.split("=", 1)[1].strip().strip("\"'")
    if pretty:
        text = f"{text} ({pretty})"
    return (text or "unknown")[:MAX_STR]


def disk_total(path: str) -> int:
    """Total size of the filesystem holding ``path`` (its nearest existing parent, else /)."""
    candidate = Path(path)
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return int(psutil.disk_usage(str(candidate)).total)
    except OSError:
        return int(psutil.disk_usage("/").total)


def _parse_number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi_csv(text: str) -> list[GpuReading]:
    """Parse ``--query-gpu=name,memory.total,utilization.gpu,memory.used`` csv,noheader,nounits.

    Memory values are MiB. Malformed lines are skipped.
    """
    gpus: list[GpuReading] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.rsplit(",", 3)]
        if len(parts) != 4 or not parts[0]:
            continue
        total = _parse_number(parts[1])
        if total is None:
            continue
        used = _parse_number(parts[3])
        gpus.append(
            GpuReading(
                name=parts[0][:MAX_STR],
                memory_bytes=int(total * _MIB),
                utilization_percent=_parse_number(parts[2]),
                memory_used_bytes=None if used is None else int(used * _MIB),
            )
        )
    return gpus[:64]


class GpuProbe:
    """Reads GPUs through NVML or nvidia-smi; decides which once, at construction."""

    def __init__(self, nvidia_smi: str = "nvidia-smi") -> None:
        override = os.environ.get(NVIDIA_SMI_ENV)
        self._nvml: Any = None if override else _load_nvml()
        self._smi = shutil.which(override or nvidia_smi) if self._nvml is None else None

    def read(self) -> list[GpuReading]:
        if self._nvml is not None:
            try:
                return _read_nvml(self._nvml)
            except Exception as exc:  # NVML raises its own NVMLError family
                log.warning("NVML read failed: %s", exc)
                return []
        if self._smi is not None:
            return self._read_smi(self._smi)
        return []

    def busy_pids(self, threshold: float) -> set[int] | None:
        """Pids holding a compute context on a GPU at least ``threshold`` percent busy (the
        idle rule's GPU part; host pids, as psutil sees them). None when no GPU tool answers."""
        if self._nvml is not None:
            try:
                return _busy_pids_nvml(self._nvml, threshold)
            except Exception as exc:  # NVML raises its own NVMLError family
                log.warning("NVML read failed: %s", exc)
                return None
        if self._smi is None:
            return None
        gpus = _smi_csv(self._smi, "--query-gpu=uuid,utilization.gpu")
        apps = _smi_csv(self._smi, "--query-compute-apps=gpu_uuid,pid")
        if gpus is None or apps is None:
            return None
        busy = {row[0] for row in gpus if len(row) == 2 and _percent(row[1]) >= threshold}
        return {
            int(row[1]) for row in apps if len(row) == 2 and row[0] in busy and row[1].isdigit()
        }

    @staticmethod
    def _read_smi(exe: str) -> list[GpuReading]:
        cmd = [
            exe,
            "--query-gpu=name,memory.total,utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvidia-smi failed: %s", exc)
            return []
        if done.returncode != 0:
            log.warning("nvidia-smi exited %d: %s", done.returncode, done.stderr.strip()[:200])
            return []
        return parse_nvidia_smi_csv(done.stdout)


def _percent(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]"
        return 0.0


def _smi_csv(exe: str, query: str) -> list[list[str]] | None:
    try:
        done = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi exited %d: %s", done.returncode, done.stderr.strip()[:200])
        return None
    return [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines()[:4096]]


def _busy_pids_nvml(nvml: Any, threshold: float) -> set[int]:
    pids: set[int] = set()
    for i in range(min(int(nvml.nvmlDeviceGetCount()), 64)):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        if float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) < threshold:
            continue
        pids.update(int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    return pids


def _load_nvml() -> Any:
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # not installed, no driver, no GPU: all mean "no NVML"
        return None
    return nvml


def _read_nvml(nvml: Any) -> list[GpuReading]:
    gpus = []
    for i in range(min(int(nvml.nvmlDeviceGetCount()), 64)):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        gpus.append(
            GpuReading(
                name=str(name)[:MAX_STR],
                memory_bytes=int(mem.total),
                utilization_percent=float(util.gpu),
                memory_used_bytes=int(mem.used),
            )
        )
    return gpus


class HostProbe:
    """Specs and metrics of this host.

    ``psutil.cpu_percent`` is primed at construction so that later calls are non-blocking and
    measure the time since the previous call.
    """

    def __init__(self, workspace_root: str = "/", nvidia_smi: str = "nvidia-smi") -> None:
        self.workspace_root = workspace_root
        self.gpu = GpuProbe(nvidia_smi)
        psutil.cpu_percent(interval=None)

    def specs(self, gpus: list[GpuReading] | None = None) -> Specs:
        gpus = self.gpu.read() if gpus is None else gpus
        return Specs(
            cpu_model=cpu_model(),
            cpu_count=psutil.cpu_count(logical=True) or 1,
            memory_bytes=int(psutil.virtual_memory().total),
            disk_bytes=disk_total(self.workspace_root),
            os=os_description(),
            gpus=[Gpu(name=g.name, memory_bytes=g.memory_bytes) for g in gpus],
        )

    def metrics(self, gpus: list[GpuReading] | None = None) -> Metrics:
        gpus = self.gpu.read() if gpus is None else gpus
        gpu_percent = gpu_memory_percent = None
        utils = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
        if utils:
            gpu_percent = _clamp(sum(utils) / len(utils))
        with_used = [g for g in gpus if g.memory_used_bytes is not None and g.memory_bytes > 0]
        if with_used:
            used = sum(g.memory_used_bytes or 0 for g in with_used)
            gpu_memory_percent = _clamp(100.0 * used / sum(g.memory_bytes for g in with_used))
        return Metrics(
            cpu_percent=_clamp(psutil.cpu_percent(interval=None)),
            memory_percent=_clamp(psutil.virtual_memory().percent),
            gpu_percent=gpu_percent,
            gpu_memory_percent=gpu_memory_percent,
        )


def _clamp(value: float) -> float:
    return min(100.0, max(0.0, float(value)))
