from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexcompute_agent.config import (
    AgentConfig,
    ConfigError,
    config_from_dict,
    dumps_toml,
    load_config,
    write_private_file,
)

if TYPE_CHECKING:
    from pathlib import Path


def test_defaults_fill_missing_keys() -> None:
    config = config_from_dict({"server": "https://nexus.example.edu/"})
    assert config.server == "https://nexus.example.edu"
    assert config.heartbeat_seconds == 10.0
    assert config.jupyter_command == ("jupyter", "lab")
    assert config.tunnel.kind == "direct"
    assert (config.backoff_initial, config.backoff_max) == (1.0, 60.0)
    assert config.presence_ignore_users == ()
    assert config.activity_seconds == 60.0
    assert config.session_cgroup_parent == "nexcompute"
    assert config_from_dict({"server": "http://x", "activity_seconds": 0.2}).activity_seconds == 0.2


@pytest.mark.parametrize(
    ("server", "url"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/agent/"),
        ("https://nexus.example.edu/", "wss://nexus.example.edu/ws/agent/"),
        ("https://example.edu/nexus", "wss://example.edu/nexus/ws/agent/"),
    ],
)
def test_websocket_url(server: str, url: str) -> None:
    assert AgentConfig(server=server).websocket_url == url


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"server": "ftp://x"},
        {"server": "http://x", "heartbeat_seconds": 0},
        {"server": "http://x", "heartbeat_seconds": "10"},
        {"server": "http://x", "heartbeat_seconds": True},
        {"server": "http://x", "jupyter_command": "jupyter lab"},
        {"server": "http://x", "jupyter_command": []},
        {"server": "http://x", "tunnel": {"kind": "ngrok"}},
        {"server": "http://x", "tunnel": {"kind": "cloudflared-named"}},
        {"server": "http://x", "session_user": "root; rm -rf /"},
        {"server": "http://x", "backoff_initial": 5, "backoff_max": 1},
        {"server": "http://x", "machine_id": "7"},
        {"server": "http://x", "activity_seconds": 0},
        {"server": "http://x", "activity_seconds": "60"},
        {"server": "http://x", "session_cgroup_parent": "../../memory"},
        {"server": "http://x", "session_cgroup_parent": ""},
        {"server": "http://x", "session_cgroup_parent": ".hidden"},
    ],
)
def test_bad_values_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        config_from_dict(data)


def test_load_refuses_a_readable_file_with_a_credential(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    write_private_file(path, dumps_toml({"server": "http://x", "credential": "secret"}))
    assert load_config(path).credential == "secret"
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config(path)
    assert load_config(path, require_credential=False).server == "http://x"


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    write_private_file(bad, "server = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    empty = tmp_path / "empty.toml"
    write_private_file(empty, 'server = "http://x"\n')
    with pytest.raises(ConfigError, match="no credential"):
        load_config(empty)


def test_repr_hides_the_credential() -> None:
    assert "s3cret" not in repr(AgentConfig(server="http://x", credential="s3cret"))


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        text,
        text | st.integers() | st.booleans() | st.floats(allow_nan=False) | st.lists(text),
        max_size=5,
    ),
    st.dictionaries(text, text, max_size=3),
)
def test_toml_writer_round_trips(top: dict[str, object], table: dict[str, str]) -> None:
    top = {k: v for k, v in top.items() if k != "t"}
    doc = {**top, "t": table}
    assert tomllib.loads(dumps_toml(doc)) == doc


def test_sessions_outlive_a_stop_under_systemd_or_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nexcompute_agent.config import keeps_sessions_on_stop

    auto = config_from_dict({"server": "http://x"})
    assert auto.keep_sessions_on_stop == "auto" and not keeps_sessions_on_stop(auto)
    monkeypatch.setenv("INVOCATION_ID", "0123abcd")  # what systemd sets for a service
    assert keeps_sessions_on_stop(auto)
    never = config_from_dict({"server": "http://x", "keep_sessions_on_stop": False})
    assert not keeps_sessions_on_stop(never)
    monkeypatch.delenv("INVOCATION_ID")
    always = config_from_dict({"server": "http://x", "keep_sessions_on_stop": True})
    assert keeps_sessions_on_stop(always)
    with pytest.raises(ConfigError, match="keep_sessions_on_stop"):
        config_from_dict({"server": "http://x", "keep_sessions_on_stop": "sometimes"})


def test_the_owners_workspace_ceiling_caps_what_the_policy_asks() -> None:
    """``session_workspace_max_gb``: the owner's ceiling on the workspace reserved on this
    machine's disk, whatever the server's policy asks (0: none)."""
    from types import SimpleNamespace

    from nexcompute_agent.protocol import SessionLimits, SessionStart
    from nexcompute_agent.sessions.manager import SessionManager

    def limits(config: AgentConfig, asked: int | None) -> int | None:
        msg = SessionStart(
            msgid="m1", session_id=1, token="t", duration_seconds=60,
            limits=SessionLimits(workspace_bytes=asked) if asked else None,
        )  # fmt: skip
        return SessionManager._limits(SimpleNamespace(config=config), msg).workspace_bytes  # type: ignore[arg-type]

    gib = 1 << 30
    capped = config_from_dict({"server": "http://x", "session_workspace_max_gb": 2})
    assert capped.session_workspace_max_gb == 2.0
    assert limits(capped, 20 * gib) == 2 * gib  # the policy's 20 GB, capped
    assert limits(capped, gib) == gib  # less than the ceiling: as asked
    assert limits(capped, None) == 2 * gib  # the agent's own default (20 GB), capped too
    free = config_from_dict({"server": "http://x"})
    assert free.session_workspace_max_gb == 0.0
    assert limits(free, 20 * gib) == 20 * gib
