"""``nexcompute-agent``: enroll, run, probe.

Exit codes: 0 ok; 1 server unreachable or unusable answer (enroll); 2 bad arguments or config;
3 credential/enrollment refused; 4 protocol version mismatch; 5 replaced by another agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nexcompute_agent import __version__, sessionenv
from nexcompute_agent.agent import Agent
from nexcompute_agent.config import (
    TUNNEL_KINDS,
    AgentConfig,
    ConfigError,
    config_from_dict,
    default_config_path,
    load_config,
    read_toml,
    validate_server_url,
    write_config,
)
from nexcompute_agent.enroll import EnrollmentFailed, EnrollmentRefused, enroll
from nexcompute_agent.presence import make_detector
from nexcompute_agent.probe import HostProbe

EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3


def _join_token_value(argv: list[str]) -> list[str]:
    """Turn ``--token T`` into ``--token=T``: join tokens may begin with '-', which argparse
    would otherwise read as an option and report the value as missing."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--token" and i + 1 < len(argv):
            out.append(f"--token={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, help=f"config file (default {default_config_path()})"
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")

    parser = argparse.ArgumentParser(prog="nexcompute-agent", description="NexCompute lab agent")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_enroll = sub.add_parser(
        "enroll", parents=[common], help="exchange a join token for a credential"
    )
    p_enroll.add_argument("--server", required=True, help="Nexus base URL, e.g. https://nexus.x")
    p_enroll.add_argument(
        "--token", required=True, help="one-time join token (use --token=T if T starts with -)"
    )
    p_enroll.add_argument("--workspace-root", help="where session workspaces live")
    p_enroll.add_argument(
        "--session-user",
        help="one existing unprivileged OS account for every session (a pool of one)",
    )
    p_enroll.add_argument(
        "--pool-size",
        type=int,
        default=4,
        help="session accounts <prefix>1..<prefix>K, one per session (default 4; made as root)",
    )
    p_enroll.add_argument("--pool-prefix", default="nxs-", help="session account prefix (nxs-)")
    p_enroll.add_argument(
        "--create-accounts",
        action="store_true",
        help="create the pool's session accounts now (root; listed in cron.deny and at.deny)",
    )
    p_enroll.add_argument("--tunnel", choices=TUNNEL_KINDS, help="how sessions are reached")
    p_enroll.add_argument(
        "--session-env",
        help="the built session environment Jupyter runs from (default: $NEXCOMPUTE_SESSION_ENV "
        "or /opt/nexcompute/session-env, whichever is built)",
    )

    sub.add_parser("run", parents=[common], help="run the agent until SIGTERM/SIGINT")
    sub.add_parser("probe", parents=[common], help="print this host's specs and metrics as JSON")
    _add_rollout_commands(sub, common)
    return parser


def _add_rollout_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """install, uninstall, doctor: setting up a lab computer end to end."""
    p_install = sub.add_parser(
        "install",
        parents=[common],
        help="set this computer up as a lab agent: accounts, workspace, session environment, "
        "enrollment, config and systemd unit (root)",
    )
    p_install.add_argument("--server", required=True, help="Nexus base URL")
    p_install.add_argument("--token", required=True, help="join token (use --token=T)")
    p_install.add_argument("--pool-size", type=int, default=4, help="session accounts (4)")
    p_install.add_argument("--pool-prefix", default="nxs-", help="session account prefix (nxs-)")
    p_install.add_argument("--tunnel", choices=TUNNEL_KINDS, help="how sessions are reached")
    p_install.add_argument("--workspace-root", help="where session workspaces live")
    p_install.add_argument(
        "--session-env",
        help="use this built session environment instead of building /opt/nexcompute/session-env",
    )
    p_install.add_argument(
        "--jupyter-ext",
        help="the nexcompute-jupyter wheel (built by make dist beside the agent's) that the "
        "session environment needs; default: the checkout's jupyter_ext/",
    )
    p_install.add_argument("--state-dir", help="agent state (default /var/lib/nexcompute/agent)")
    p_install.add_argument(
        "--unit-dir", type=Path, default=None, help="systemd unit folder (/etc/systemd/system)"
    )
    sub.add_parser("uninstall", parents=[common], help="remove everything install set up (root)")
    sub.add_parser(
        "doctor", parents=[common], help="check this host and its enrollment, one line per check"
    )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str, code: int) -> int:
    print(f"nexcompute-agent: {message}", file=sys.stderr)
    return code


def cmd_enroll(args: argparse.Namespace) -> int:
    path: Path = args.config or default_config_path()
    try:
        server = validate_server_url(args.server)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if not args.token:
        return _fail("--token must not be empty", EXIT_CONFIG)
    defaults = AgentConfig(server=server)
    planned = defaults.to_toml_dict()
    if args.workspace_root:
        planned["workspace_root"] = args.workspace_root
    if args.session_user:
        planned["session_user"] = args.session_user
        planned["session_pool_size"] = 0
    else:
        planned["session_pool_prefix"] = args.pool_prefix
        planned["session_pool_size"] = args.pool_size
    if args.tunnel:
        planned["tunnel"]["kind"] = args.tunnel
    env = sessionenv.find(args.session_env)
    if args.session_env and env is None:
        return _fail(
            f"--session-env {args.session_env} is not a built session environment (no "
            f"bin/jupyter-lab); build it with: sh {sessionenv.recipe()} {args.session_env}",
            EXIT_CONFIG,
        )
    if env is not None:
        planned["jupyter_command"] = sessionenv.jupyter_command(env)
    try:
        config_from_dict(planned)  # check the options before spending the one-time token
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)

    try:
        result = enroll(server, args.token)
    except EnrollmentRefused as exc:
        print(f"enrollment refused: {exc.detail}", file=sys.stderr)
        return EXIT_REFUSED
    except EnrollmentFailed as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)

    planned.update(credential=result.credential, machine_id=result.machine_id)
    config = config_from_dict(planned, path)
    if args.create_accounts and config.session_pool_size:
        from nexcompute_agent.sessions.accounts import create_accounts, pool_names

        names = pool_names(config.session_pool_prefix, config.session_pool_size, "")
        try:
            create_accounts(names)
        except (OSError, subprocess.SubprocessError) as exc:
            return _fail(f"enrolled, but cannot create the session accounts: {exc}", EXIT_CONFIG)
        print(f"session accounts ready: {', '.join(names)}")
    try:
        write_config(path, config)
    except OSError as exc:
        return _fail(f"enrolled, but cannot write {path}: {exc}", EXIT_CONFIG)
    print(f"enrolled as machine {result.machine_id} ({result.name}); config written to {path}")
    if env is not None:
        print(f"sessions run Jupyter from {env}")
    else:
        print(
            "no session environment found ($NEXCOMPUTE_SESSION_ENV, "
            f"{sessionenv.DEFAULT_DIR}): sessions will fail until one is built. Build it with\n"
            f"  sh {sessionenv.recipe()} {sessionenv.DEFAULT_DIR}\n"
            f'and set jupyter_command = ["{sessionenv.DEFAULT_DIR}/bin/jupyter", "lab"] in {path}'
        )
    print(f"start the agent with: nexcompute-agent run --config {path}")
    return 0


async def _run_agent(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        with contextlib.suppress(NotImplementedError):  # Windows event loops
            loop.add_signal_handler(sig, agent.request_stop)
    try:
        return await agent.run()
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    return asyncio.run(_run_agent(config))


def cmd_probe(args: argparse.Namespace) -> int:
    path: Path = args.config or default_config_path()
    config = AgentConfig(server="http://127.0.0.1")
    if args.config or path.exists():
        try:
            data = read_toml(path)
            data.setdefault("server", config.server)  # probe needs no server
            config = config_from_dict(data, path)
        except ConfigError as exc:
            return _fail(str(exc), EXIT_CONFIG)
    probe = HostProbe(config.workspace_root, config.nvidia_smi)
    time.sleep(0.25)  # let the primed cpu_percent measure a real interval
    gpus = probe.gpu.read()
    presence = make_detector(config).sample()
    from nexcompute_agent.hostos import sessions_unsupported

    out: dict[str, Any] = {
        "specs": probe.specs(gpus).model_dump(mode="json"),
        "metrics": probe.metrics(gpus).model_dump(mode="json"),
        "owner_present": presence.owner_present,
        "idle_seconds": presence.idle_seconds,
        "locked": presence.locked,
        "presence_source": presence.source,
        "sessions": sessions_unsupported() or "supported",
    }
    if sessions_unsupported() is None:
        from nexcompute_agent.sessions.sandbox import detect

        support = detect()
        # What this host can enforce for sessions (docs/sandbox.md).
        out["sandbox"] = {**support.as_dict(), "summary": support.lines()}
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(
        _join_token_value(list(sys.argv[1:] if argv is None else argv))
    )
    _setup_logging(args.verbose)
    if args.command == "enroll":
        return cmd_enroll(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command in ("install", "uninstall", "doctor"):
        from nexcompute_agent import rollout

        return int(getattr(rollout, f"cmd_{args.command}")(args))
    return cmd_probe(args)
