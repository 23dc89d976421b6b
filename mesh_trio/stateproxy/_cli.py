# `asya-state-proxy`: run the state proxy from the environment until SIGINT or SIGTERM.
#
# Settings come from `Settings.from_env`; a bad one ends the process at once with exit status 2
# and one line on stderr naming the variable. A start that fails for want of PostgreSQL or of
# the socket exits 1 with one line, also naming the variable. The first SIGINT/SIGTERM drains
# (in-flight requests finish, for up to ASYA_STATE_PROXY_GRACE seconds, default 10); a second one
# stops at once.

from __future__ import annotations

import argparse
import logging
import signal
import sys
from importlib.metadata import version
from typing import NoReturn

import trio

from .._observability import configure_logging
from ._errors import StartupError
from ._server import serve_state_proxy
from ._settings import SETTINGS, Settings, SettingsError

logger = logging.getLogger("mesh_trio.stateproxy")

PROG = "asya-state-proxy"
PACKAGE = "asya-mesh-api"  # the distribution that installs this command
_SETTING_VARIABLES = {
    "socket": "CONNECTOR_SOCKET",
    "pg_url": "STATE_PROXY_PG_URL",
    "metrics_port": "STATE_PROXY_METRICS_PORT",
}
_DESCRIPTION = (
    "Serve the Asya state-proxy protocol (HTTP/1.1 over a Unix socket) backed by PostgreSQL."
)


def settings_help() -> str:
    """The `--help` text of the settings, generated from `SETTINGS`."""
    lines = ["settings (environment variables only):"]
    for setting in SETTINGS:
        lines.append(f"  {setting.env} ({setting.shown_default})")
        lines.append(f"      {setting.meaning}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the state proxy; exits with 0 after a signal, 1 if it cannot start, 2 on bad settings."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {version(PACKAGE)}")
    parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(2, str(exc))
    configure_logging(settings.log_level, settings.log_format)
    failed = trio.run(_run, settings)
    if failed is not None:
        _fail(1, f"{_SETTING_VARIABLES.get(failed.setting, failed.setting)}: {failed.message}")


async def _run(settings: Settings) -> StartupError | None:
    """Serve until signalled; returns why the proxy could not start, if it could not."""
    first_signal = trio.Event()
    failed: list[StartupError] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    if first_signal.is_set():
                        logger.info("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return
                    logger.info("%s: draining", signal.Signals(signum).name)
                    first_signal.set()

            async def serve() -> None:
                try:
                    await serve_state_proxy(
                        settings.socket_path,
                        settings.pg_url,
                        indexes=settings.indexes,
                        shutdown_trigger=first_signal.wait,
                        grace_period=settings.grace,
                        metrics_port=settings.metrics_port,
                        event_buffer=settings.event_buffer,
                        event_age=settings.event_age,
                    )
                except StartupError as exc:
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(serve)
    return failed[0] if failed else None


def _fail(status: int, line: str) -> NoReturn:
    print(f"{PROG}: {line}", file=sys.stderr)
    sys.exit(status)
