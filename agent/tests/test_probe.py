from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from nexcompute_agent.probe import HostProbe, disk_total, os_description, parse_nvidia_smi_csv

if TYPE_CHECKING:
    from pathlib import Path

MIB = 1024 * 1024


@pytest.fixture
def fake_smi(tests_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tests_dir / "bin" / "fake-nvidia-smi"
    monkeypatch.setenv("NEXCOMPUTE_NVIDIA_SMI", str(path))
    return path


def test_specs_and_metrics_of_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXCOMPUTE_NVIDIA_SMI", str(tmp_path / "no-such-nvidia-smi"))
    probe = HostProbe(str(tmp_path / "not" / "yet"))
    specs = probe.specs()
    assert specs.cpu_count >= 1 and specs.memory_bytes > 0 and specs.disk_bytes > 0
    assert specs.cpu_model and specs.os.startswith(specs.os.split()[0])
    assert specs.gpus == []
    metrics = probe.metrics()
    assert 0 <= metrics.cpu_percent <= 100 and 0 < metrics.memory_percent <= 100
    assert metrics.gpu_percent is None


def test_gpus_come_from_nvidia_smi(fake_smi: Path) -> None:
    probe = HostProbe("/")
    specs = probe.specs()
    assert [(g.name, g.memory_bytes) for g in specs.gpus] == [
        ("NVIDIA H200", 143771 * MIB),
        ("NVIDIA RTX A4000", 16376 * MIB),
    ]
    metrics = probe.metrics()
    assert metrics.gpu_percent == 40.0  # the A4000 reports [N/A]
    assert metrics.gpu_memory_percent == pytest.approx(100 * 71885 / (143771 + 16376))


def test_nvidia_smi_parsing_skips_junk() -> None:
    text = "Tesla, V100, 16160, 5, 100\n\ngarbage\nX, [N/A], 1, 1\n"
    assert [g.name for g in parse_nvidia_smi_csv(text)] == ["Tesla, V100"]


def test_os_and_disk_helpers() -> None:
    assert os_description()
    assert disk_total("/definitely/not/here") == disk_total("/")


def test_probe_command_prints_json(fake_smi: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('server = "http://127.0.0.1:1"\n')
    done = subprocess.run(
        [sys.executable, "-m", "nexcompute_agent", "probe", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    out = json.loads(done.stdout)
    assert set(out) == {"specs", "metrics", "owner_present", "idle_seconds", "locked",
                        "presence_source", "sessions", "sandbox"}  # fmt: skip
    assert out["sessions"] == "supported" and out["presence_source"] in ("logind", "utmp")
    # What this host can enforce: here (root, cgroup v1, loop devices) everything.
    assert out["sandbox"]["bwrap"] and out["sandbox"]["cgroup"] in ("v1", "v2")
    assert out["sandbox"]["limits"] == {"memory": True, "cpu": True, "tasks": True,
                                        "workspace": True}  # fmt: skip
    assert any(line.startswith("memory limit: enforced") for line in out["sandbox"]["summary"])
    assert out["specs"]["gpus"][0]["name"] == "NVIDIA H200"
    assert out["metrics"]["gpu_percent"] == 40.0
