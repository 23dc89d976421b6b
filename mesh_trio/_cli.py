"""`asya-mesh-api`: read the environment, run `serve()` until SIGINT/SIGTERM, exit 0."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys

import trio

from ._config import Config, ConfigError
from ._server import serve


async def _run(config: Config) -> None:
    # Signals are caught from the very start, so one that arrives while the listeners are
    # still starting also ends in an orderly shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def until_signal() -> None:
            async for signum in signals:
                logging.getLogger("mesh_trio").info("received %s", signal.Signals(signum).name)
                return

        await serve(config, shutdown_trigger=until_signal)


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
    """Run the mesh API; returns the exit code (2 for a configuration error)."""
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        print(f"asya-mesh-api: configuration error: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(_run, config)
    except ConfigError as exc:
        print(f"asya-mesh-api: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"asya-mesh-api: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
