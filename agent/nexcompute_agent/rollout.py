"""The command-line side of ``install``, ``uninstall`` and ``doctor`` (see ``install.py`` and
``doctor.py`` for what they do)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nexcompute_agent import sessionenv
from nexcompute_agent.config import (
    AgentConfig,
    ConfigError,
    config_from_dict,
    default_config_path,
    default_state_dir,
    validate_server_url,
    write_config,
)
from nexcompute_agent.enroll import EnrollmentFailed, EnrollmentRefused, enroll
from nexcompute_agent.install import (
    UNIT_DIR,
    InstallError,
    InstallRecord,
    install_unit,
    make_dirs,
    prepare_host,
    record_path,
    require_root,
    uninstall,
)

if TYPE_CHECKING:
    import argparse

EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3


def _fail(message: str, code: int) -> int:
    print(f"nexcompute-agent: {message}", file=sys.stderr)
    return code


def cmd_install(args: argparse.Namespace) -> int:
    try:
        require_root()
        server = validate_server_url(args.server)
    except (InstallError, ConfigError) as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if not args.token:
        return _fail("--token must not be empty", EXIT_CONFIG)
    path: Path = (args.config or default_config_path()).absolute()
    rpath = record_path(path)
    if rpath.exists() or path.exists():
        return _fail(
            f"{path} exists already: this computer is set up. Run `nexcompute-agent uninstall"
            f" --config {path}` first to start over",
            EXIT_CONFIG,
        )
    planned = AgentConfig(server=server).to_toml_dict()
    planned.update(session_pool_prefix=args.pool_prefix, session_pool_size=args.pool_size)
    planned["state_dir"] = args.state_dir or default_state_dir()
    if args.workspace_root:
        planned["workspace_root"] = args.workspace_root
    if args.tunnel:
        planned["tunnel"]["kind"] = args.tunnel
    if args.pool_size < 1:
        return _fail("--pool-size must be at least 1", EXIT_CONFIG)
    try:
        config = config_from_dict(planned)  # check the options before changing anything
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)

    record = InstallRecord(config=str(path), unit="", state_dir=config.state_dir)
    try:
        # The record is written even when a step fails, so uninstall can undo the rest.
        make_dirs(path.parent, 0o700, record.dirs)
        record.save(rpath)
        if args.jupyter_ext:
            # Read by the packaged recipe (data/make-session-env.sh).
            os.environ["NEXCOMPUTE_JUPYTER_EXT"] = str(Path(args.jupyter_ext).resolve())
        env = prepare_host(record, config, session_env=args.session_env)
        record.save(rpath)
        try:
            result = enroll(server, args.token)
        except EnrollmentRefused as exc:
            print(f"enrollment refused: {exc.detail}", file=sys.stderr)
            print(f"undo what was set up with: nexcompute-agent uninstall --config {path}")
            return EXIT_REFUSED
        except EnrollmentFailed as exc:
            print(f"undo what was set up with: nexcompute-agent uninstall --config {path}")
            return _fail(str(exc), EXIT_UNREACHABLE)
        planned.update(
            credential=result.credential,
            machine_id=result.machine_id,
            jupyter_command=sessionenv.jupyter_command(env),
        )
        write_config(path, config_from_dict(planned, path))
        print(f"enrolled as machine {result.machine_id} ({result.name}); config {path}")
        print(install_unit(record, path, args.unit_dir or UNIT_DIR))
    except InstallError as exc:
        print(f"undo what was set up with: nexcompute-agent uninstall --config {path}")
        return _fail(str(exc), EXIT_CONFIG)
    finally:
        if rpath.parent.exists():
            record.save(rpath)
    print(f"check this computer with: nexcompute-agent doctor --config {path}")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    path: Path = (args.config or default_config_path()).absolute()
    try:
        require_root()
        problems = uninstall(path)
    except InstallError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    for problem in problems:
        print(f"nexcompute-agent: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print("uninstalled: nothing of the agent's set-up is left")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from nexcompute_agent.doctor import run_doctor

    return run_doctor(args.config)


__all__ = ["cmd_doctor", "cmd_install", "cmd_uninstall"]
