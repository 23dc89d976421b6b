"""`asya-mesh-api`: read the environment, run `serve()` until SIGINT/SIGTERM, exit 0.

Settings are environment variables only (`_config.SETTINGS`); the command line takes just
`--help` (which lists them, generated from the schema) and `--version`, and anything else is a
usage error (exit 2). Every failure to start is one line on stderr naming its cause: a bad
setting exits 2, a port, host or file that cannot be used exits 1. trio wraps a failure in one
`ExceptionGroup` per nursery it crosses; `root_cause` unwraps them. An unreachable state proxy
is not a failure: the server starts with a warning and `/ready` answers 503 until it is up.
With `ASYA_MESH_WORKERS` above 1 this process is the supervisor of that many worker processes,
which run this same `main` (`_workers.py`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterable
from importlib.metadata import version

import trio

from mesh_proto import ServiceError

from ._config import SETTINGS, Config, ConfigError, Setting, StartupError, root_cause
from ._observability import configure_logging
from ._server import serve
from ._workers import Worker, check_workers, supervise

PROG = "asya-mesh-api"
log = logging.getLogger("mesh_trio")


def settings_help(settings: Iterable[Setting]) -> str:
    """The `--help` text of the settings: each variable, its default and its meaning."""
    lines = ["settings (environment variables only):"]
    for setting in settings:
        lines.append(f"  {setting.env} (default: {setting.shown_default.replace('`', '')})")
        lines.append(f"      {setting.meaning.replace('`', '')}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line: `--help` and `--version`; any other argument is a usage error."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve the mesh API: clients on the external port, sidecars on the internal.",
        epilog=settings_help(SETTINGS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version(PROG)}")
    return parser


async def _warn_if_proxy_unreachable(path: str) -> None:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        log.warning(
            "ASYA_STATEPROXY_SOCKET=%s: state proxy not reachable (%s); "
            "/ready answers 503 until it is",
            path,
            exc.strerror or exc,
        )
    else:
        await stream.aclose()


async def _run(config: Config, worker: Worker | None) -> int:
    """Serve until a signal: one process, a worker of a supervisor, or the supervisor of
    `config.workers` workers (`_workers.py`); the exit status."""
    # Signals are caught from the very start, so one that arrives while the listeners are
    # still starting also ends in an orderly shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def until_signal() -> None:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                return

        if worker is not None:
            await worker.run(config, until_signal)
            return 0
        if config.state_proxy_socket is not None:
            await _warn_if_proxy_unreachable(config.state_proxy_socket)
        if config.workers > 1:
            return await supervise(config, signals)
        await serve(config, shutdown_trigger=until_signal)
        return 0


def tune_gc() -> None:
    """Make CPython's full garbage collections rare.

    The embedded store keeps every envelope as long-lived objects, and a full collection walks
    all of them: at 100 000 envelopes, about 0.2 s every thousand creates (docs/performance.md).
    Young collections still run often; what they miss waits for a full collection, which now
    comes after about a hundred times more allocations. Objects made at start-up are frozen
    out of collection altogether.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 1_000)


def main(argv: list[str] | None = None) -> int:
    """Run the mesh API; returns the exit code.

    0 after SIGINT/SIGTERM, 2 for a bad setting (or a usage error, which argparse exits with),
    1 when the server cannot start (port in use, host unknown, store unusable). Any other
    exception is a bug and keeps its traceback.
    """
    parser().parse_args(argv)
    try:
        config = Config.from_env(os.environ)
        worker = Worker.from_env(os.environ)
        check_workers(config)
    except ConfigError as exc:
        return _fail(2, f"configuration error: {exc}")
    tune_gc()
    configure_logging(config.log_level.upper(), config.log_format)
    if worker is not None:
        worker.tag_logs()
    try:
        status: int = trio.run(_run, config, worker)
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, ConfigError):
            return _fail(2, f"configuration error: {cause}")
        if isinstance(cause, StartupError | OSError | ServiceError):
            return _fail(1, f"cannot start: {cause}")
        raise
    return status


def _fail(status: int, line: str) -> int:
    print(f"{PROG}: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
