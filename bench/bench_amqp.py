# Publish throughput of the RabbitMQ dispatcher: N confirmed messages at concurrency C.
#
# Declares a durable queue of its own on the broker, then runs `--runs` times: purge the queue,
# open a dispatcher (`mesh_trio.transports._amqp.open_rabbitmq_dispatcher`), start C tasks that
# together send N messages (each `send` returns only after the broker's publisher confirm), and
# time from the first send to the last confirm. Prints every run and the median messages/s, with
# the CPU this process used as a share of one core (a figure near 100 % means the client is the
# limit, not the broker). The queue is deleted at the end.
#
# Run: .venv/bin/python bench/bench_amqp.py [-n 20000] [-c 200] [--size 512]
#      [--channels 4] [--max-in-flight 1024] [--url amqp://guest:guest@127.0.0.1:5672/]

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import uuid
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh_trio.transports._amqp import open_rabbitmq_dispatcher
from tests.amqp_helpers import open_admin


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _one_run(args: argparse.Namespace, queue: str, body: bytes) -> tuple[float, float]:
    remaining = args.n
    async with open_rabbitmq_dispatcher(
        args.url, "", channels=args.channels, max_in_flight=args.max_in_flight
    ) as dispatcher:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await dispatcher.send(queue, body)

        wall, cpu = time.perf_counter(), _cpu_seconds()
        async with trio.open_nursery() as nursery:
            for _ in range(args.c):
                nursery.start_soon(worker)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        stats = dispatcher.statistics()
        assert stats.confirmed == args.n, stats
    return args.n / wall, cpu / wall


async def main(args: argparse.Namespace) -> None:
    queue = f"asya-bench-amqp-{uuid.uuid4().hex[:8]}"
    envelope = {"id": str(uuid.uuid4()), "route": {"prev": [], "curr": "bench", "next": []}}
    padding = max(0, args.size - len(json.dumps(envelope)) - 16)
    body = json.dumps({**envelope, "payload": "x" * padding}).encode()
    async with open_admin(args.url) as admin:
        await admin.declare_queue(queue)
        try:
            rates = []
            for run in range(args.runs):
                await admin.purge_queue(queue)
                rate, cpu = await _one_run(args, queue, body)
                rates.append(rate)
                print(
                    f"run {run + 1}: {rate:,.0f} messages/s "
                    f"({args.n} x {len(body)} B, concurrency {args.c}, client CPU {cpu:.0%})"
                )
            print(f"median: {statistics.median(rates):,.0f} messages/s")
        finally:
            await admin.delete_queue(queue)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000, help="messages per run")
    parser.add_argument("-c", type=int, default=200, help="concurrent senders")
    parser.add_argument("--size", type=int, default=512, help="approximate body size in bytes")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    trio.run(main, parser.parse_args())
