"""`asya-mesh-api`: read the environment, run `serve()` until SIGINT/SIGTERM, exit 0."""

from __future__ import annotations

import logging
import os
import signal
import sys
from functools import partial

import trio

from ._config import Config, ConfigError
from ._server import serve


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logging.getLogger("mesh_trio").info("received %s", signal.Signals(signum).name)
            return


def main(argv: list[str] | None = None) -> int:
    """Run the mesh API; returns the exit code (2 for a configuration error)."""
    try:
        config = Config.from_env(os.environ)
    except ConfigError as exc:
        print(f"asya-mesh-api: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        trio.run(partial(serve, config, shutdown_trigger=_until_signal))
    except ConfigError as exc:
        print(f"asya-mesh-api: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"asya-mesh-api: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
