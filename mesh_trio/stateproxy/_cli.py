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
import os
import signal
import sys
from typing import NoReturn

import trio

from ._errors import StartupError
from ._server import serve_state_proxy
from ._settings import Settings, SettingsError

logger = logging.getLogger("mesh_trio.stateproxy")

_SETTING_VARIABLES = {"socket": "CONNECTOR_SOCKET", "pg_url": "STATE_PROXY_PG_URL"}
_DESCRIPTION = """\
Serve the Asya state-proxy protocol (HTTP/1.1 over a Unix socket) backed by PostgreSQL.

environment:
  CONNECTOR_SOCKET        Unix socket path to serve (required)
  STATE_PROXY_PG_URL      PostgreSQL URL, e.g. postgresql://user@host:5432/db (required)
  STATE_PROXY_PG_INDEXES  comma-separated value fields to index, e.g. status,deadline_at
  ASYA_LOG_LEVEL          debug, info (default), warning, error
  ASYA_STATE_PROXY_GRACE  seconds to drain on SIGTERM (default 10)
"""


def main(argv: list[str] | None = None) -> None:
    """Run the state proxy; exits with 0 after a signal, 1 if it cannot start, 2 on bad settings."""
    parser = argparse.ArgumentParser(
        prog="asya-state-proxy",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    try:
        level = _log_level(os.environ.get("ASYA_LOG_LEVEL", "info"))
        grace = _grace(os.environ.get("ASYA_STATE_PROXY_GRACE", "10"))
        settings = Settings.from_env()
    except SettingsError as exc:
        _fail(2, str(exc))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failed = trio.run(_run, settings, grace)
    if failed is not None:
        _fail(1, f"{_SETTING_VARIABLES.get(failed.setting, failed.setting)}: {failed.message}")


async def _run(settings: Settings, grace: float) -> StartupError | None:
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
                        grace_period=grace,
                    )
                except StartupError as exc:
                    failed.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            nursery.start_soon(serve)
    return failed[0] if failed else None


def _log_level(text: str) -> int:
    level = logging.getLevelNamesMapping().get(text.strip().upper())
    if level is None:
        raise SettingsError(f"ASYA_LOG_LEVEL is invalid: {text!r} (want debug, info, warning...)")
    return level


def _grace(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("s"))
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise SettingsError(f"ASYA_STATE_PROXY_GRACE is invalid: {text!r} (want seconds >= 0)")
    return value


def _fail(status: int, line: str) -> NoReturn:
    print(f"asya-state-proxy: {line}", file=sys.stderr)
    sys.exit(status)
