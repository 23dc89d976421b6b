# The real server (`asya-mesh-api`) with Python's cyclic garbage collector watched or turned off,
# to tell how much of a figure is the collector's: run it in place of the server with
# `bench/run.py --ours-cmd ".venv/bin/python bench/gc_probe.py [--disable]"`.
#
# Without `--disable` a thread writes one line every 2 s to stderr (the server log in
# bench/results/): per generation, how many collections so far and the seconds they took, and
# how many objects the collector tracks. With `--disable` the collector never runs (memory of
# reference cycles is then never reclaimed: for a measurement only).

from __future__ import annotations

import gc
import sys
import threading
import time
from typing import Any

from mesh_trio._cli import main

STATS = {generation: [0, 0.0] for generation in range(3)}
_began = [0.0]


def _callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _began[0] = time.perf_counter()
    else:
        entry = STATS[info["generation"]]
        entry[0] += 1
        entry[1] += time.perf_counter() - _began[0]


def _report() -> None:
    while True:
        time.sleep(2)
        parts = " ".join(f"gen{g}: n={n} t={t:.3f}s" for g, (n, t) in STATS.items())
        print(
            f"gc_probe {time.time():.0f} {parts} tracked={len(gc.get_objects())}", file=sys.stderr
        )


if __name__ == "__main__":
    if "--disable" in sys.argv:
        sys.argv.remove("--disable")
        gc.disable()
    else:
        gc.callbacks.append(_callback)
        threading.Thread(target=_report, daemon=True).start()
    sys.argv[0] = "asya-mesh-api"
    sys.exit(main())
