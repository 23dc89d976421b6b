"""Microseconds per parse of request bodies, without and with the nesting bound.

Ordinary bodies (a create, a status event, a FLY event) never get past the bound's first step,
two byte counts; bodies with more opening brackets than the bound take the full check. Run:
`python bench/json_depth.py`.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from mesh_proto import MAX_DEPTH, loads

CREATE = {
    "payload": {"text": "tokens arrive one by one", "delay": 0.3, "items": [1, 2, {"a": [3]}]},
    "headers": {"x-trace": "abc", "x-user": "u1"},
    "timeout": 30,
}
STATUS = {
    "type": "status",
    "status": "processing",
    "data": {"prev": ["a"], "curr": "b", "next": ["c", "d"], "progress": 0.5},
}
FLY = {"type": "fly", "data": {"token": "hi"}}
# Past the first step: 300 objects, with and without brackets inside strings.
WIDE = {"payload": [{"i": i, "s": "text", "t": [i]} for i in range(300)]}
WIDE_BRACKETS = {"payload": [{"i": i, "s": "x[y]", "t": [i]} for i in range(300)]}


def best(call: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=7)) / number * 1e6


def main() -> None:
    cases = [
        ("create", CREATE),
        ("status event", STATUS),
        ("fly event", FLY),
        ("300 objects", WIDE),
        ("300 objects, [] in strings", WIDE_BRACKETS),
    ]
    print(f"{'body':28} {'bytes':>6} {'unbounded µs':>13} {'bounded µs':>11}")
    for name, value in cases:
        raw = json.dumps(value).encode()
        number = 200_000 if len(raw) < 1000 else 2_000
        before = best(lambda: loads(raw), number)  # noqa: B023 - timed at once, in this pass
        after = best(lambda: loads(raw, max_depth=MAX_DEPTH), number)  # noqa: B023
        print(f"{name:28} {len(raw):6} {before:13.2f} {after:11.2f}")


if __name__ == "__main__":
    main()
