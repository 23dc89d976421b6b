"""`ASYA_MESH_WORKERS=N`: N processes serving the same two ports, under one supervisor.

One mesh API process uses one core. With N > 1 the process started as `asya-mesh-api`
becomes a supervisor (`supervise`): it binds both listening sockets once (so port 0 works and
every worker serves the same ports) and starts N workers, `python -m mesh_trio` with the two
sockets inherited. Each worker runs `serve(config, sockets=...)` on them; the kernel hands each
new connection to whichever worker accepts it first, so a busy worker takes fewer. Workers
share nothing but the sockets and the state proxy, which is why N > 1 needs
`ASYA_STATEPROXY_SOCKET`: with the embedded store each worker would have a store of its own.

The supervisor tells a worker what it is through the environment (`Worker.from_env`):
`ASYA_MESH_WORKER_INDEX` (0..N-1, stamped on every log line the worker writes),
`ASYA_MESH_WORKER_FDS` (`external,internal,ready`: the inherited sockets, and a pipe the
worker writes one byte to once it listens) and `ASYA_MESH_WORKER_PARENT` (the supervisor's
pid). These are not settings: they are set only by the supervisor.

Supervision:

- Start-up: worker 0 starts first and the others once it listens, so a setting or a service
  that makes a worker fail at start (exit 1 or 2, its one line on stderr) is reported once:
  the supervisor stops the others and exits with the worker's status.
- A worker that dies later is logged once (its exit status or signal) and restarted after a
  pause: 0.5 s, doubled each time it dies again within 10 s of starting, up to 10 s.
- SIGTERM or SIGINT is forwarded to every worker; each drains as a single process does
  (`serve()`), the supervisor waits up to `ASYA_MESH_GRACEFUL_TIMEOUT` plus a margin, kills
  what is left, and exits 0.
- A worker whose supervisor is gone (killed, so it could not forward a signal) notices within
  a second (its parent pid changes) and shuts down as on SIGTERM: no orphan keeps the ports.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Final

import attrs
import trio

from ._config import Config, ConfigError, StartupError
from ._observability import JsonFormatter
from ._server import serve

log = logging.getLogger("mesh_trio.supervisor")

ENV_INDEX: Final = "ASYA_MESH_WORKER_INDEX"
ENV_FDS: Final = "ASYA_MESH_WORKER_FDS"
ENV_PARENT: Final = "ASYA_MESH_WORKER_PARENT"
BACKLOG: Final = 4096
FIRST_PAUSE: Final = 0.5
MAX_PAUSE: Final = 10.0
STEADY: Final = 10.0  # a worker that lived this long restarts after the first pause again
STOP_MARGIN: Final = 5.0  # beyond the graceful timeout, before the supervisor kills
PARENT_POLL: Final = 1.0


# --- the worker side ---------------------------------------------------------------------------


@attrs.frozen
class Worker:
    """What a supervisor told this process: it is worker `index` of the supervisor `parent`."""

    index: int
    external_fd: int
    internal_fd: int
    ready_fd: int
    parent: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Worker | None:
        """The worker this process is, or None when it was not started by a supervisor."""
        if ENV_FDS not in env:
            return None
        try:
            external, internal, ready = (int(fd) for fd in env[ENV_FDS].split(","))
            return cls(int(env[ENV_INDEX]), external, internal, ready, int(env[ENV_PARENT]))
        except (KeyError, ValueError):
            raise ConfigError(
                f"{ENV_FDS}, {ENV_INDEX}, {ENV_PARENT}: set only by the supervisor "
                "(ASYA_MESH_WORKERS); unset them"
            ) from None

    def tag_logs(self) -> None:
        """Stamp `worker=<index>` on every line this process logs (a field in JSON)."""
        for handler in logging.getLogger().handlers:
            handler.addFilter(_WorkerFilter(self.index))
            if handler.formatter is not None and not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(_Tagged(handler.formatter))

    async def run(self, config: Config, until_signal: Callable[[], Awaitable[object]]) -> None:
        """`serve()` on the inherited sockets until `until_signal` returns or the supervisor
        is gone; tells the supervisor once both ports are served."""
        sockets = (socket.socket(fileno=self.external_fd), socket.socket(fileno=self.internal_fd))
        trigger = partial(first_of, until_signal, self._parent_gone)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, config, shutdown_trigger=trigger, sockets=sockets))
            with suppress(BrokenPipeError):  # the supervisor is gone: `_parent_gone` sees it
                os.write(self.ready_fd, b"r")
            os.close(self.ready_fd)

    async def _parent_gone(self) -> None:
        # Polled: no event tells a process its parent died (PR_SET_PDEATHSIG is Linux-only
        # and follows the parent's thread that forked, which trio's spawning thread is not).
        while os.getppid() == self.parent:  # noqa: ASYNC110
            await trio.sleep(PARENT_POLL)
        log.warning("supervisor (pid %d) is gone: shutting down", self.parent)


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of `waits` returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        for wait in waits:
            nursery.start_soon(_cancel_after, wait, nursery.cancel_scope)


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


class _WorkerFilter(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


class _Tagged(logging.Formatter):
    """The text format with ` worker=<index>` at the end (JSON shows it as a field)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.inner.format(record)} worker={getattr(record, 'worker', None)}"


# --- the supervisor side -----------------------------------------------------------------------


class WorkerFailed(Exception):
    """A worker exited before it listened: what made it fail would make every restart fail."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status if status > 0 else 1


def check_workers(config: Config) -> None:
    """Refuse several workers over the embedded store: each would keep a store of its own.

    Raises:
        ConfigError: `config.workers > 1` without `ASYA_STATEPROXY_SOCKET`.
    """
    if config.workers > 1 and config.embedded:
        raise ConfigError(
            f"ASYA_MESH_WORKERS={config.workers} needs the state proxy (ASYA_STATEPROXY_SOCKET):"
            " with the embedded store each worker would keep envelopes of its own"
        )


def listen(host: str, port: int, variable: str) -> socket.socket:
    """A listening TCP socket on host:port, shared by the workers.

    Raises:
        StartupError: the host does not resolve or the port cannot be bound, naming the
            setting (the same lines as a single process's).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"ASYA_MESH_HOST={host!r}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"{variable}={port}: cannot listen on {host}:{port}: {exc.strerror}"
        ) from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def supervise(config: Config, signals: AsyncIterator[int]) -> int:
    """Bind both ports, run `config.workers` workers on them until a signal; the exit status.

    Raises:
        StartupError: a port cannot be bound (see `listen`).
    """
    external = listen(config.host, config.external_port, "ASYA_MESH_EXTERNAL_PORT")
    try:
        internal = listen(config.host, config.internal_port, "ASYA_MESH_INTERNAL_PORT")
    except StartupError:
        external.close()
        raise
    with external, internal:
        log.info(
            "mesh API supervisor listening: external %s, internal %s (%d workers)",
            url_of(external),
            url_of(internal),
            config.workers,
        )
        return await Supervisor(config, (external, internal)).run(signals)


@attrs.define(eq=False)
class Supervisor:
    """Keeps `config.workers` worker processes running on `sockets` (see the module doc)."""

    config: Config
    sockets: tuple[socket.socket, socket.socket]
    processes: dict[int, trio.Process] = attrs.Factory(dict)
    stopping: bool = False
    failed: int = 0

    async def run(self, signals: AsyncIterator[int]) -> int:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._start_all, nursery.cancel_scope)
                async for signum in signals:
                    log.info("received %s: stopping the workers", signal.Signals(signum).name)
                    await self._stop(signum)
                    break
                nursery.cancel_scope.cancel()
            if self.failed:
                await self._stop(signal.SIGTERM)
        finally:
            with trio.CancelScope(shield=True):
                await self._kill_remaining()
        return self.failed

    async def _start_all(self, scope: trio.CancelScope) -> None:
        """Worker 0 first, then the others together (see "Start-up" in the module doc)."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._keep, 0)
                for index in range(1, self.config.workers):
                    nursery.start_soon(nursery.start, partial(self._keep, index))
        except* WorkerFailed as group:
            failure = group.exceptions[0]
            assert isinstance(failure, WorkerFailed)
            self.failed = failure.status
            scope.cancel()

    async def _keep(self, index: int, task_status: trio.TaskStatus[None]) -> None:
        """Run worker `index`, and run it again each time it dies, until stopping."""
        pause, first = FIRST_PAUSE, True
        while not self.stopping:
            process, ready = await self._spawn(index)
            began = trio.current_time()
            listening = await _ready(ready)
            if first:
                if not listening and not self.stopping:
                    raise WorkerFailed(await process.wait())
                first = False
                task_status.started()
            status = await process.wait()
            if self.stopping:
                return
            if trio.current_time() - began >= STEADY:
                pause = FIRST_PAUSE
            log.warning(
                "worker %d (pid %d) %s: restarting it in %gs",
                index,
                process.pid,
                describe(status),
                pause,
            )
            await trio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
        if first:
            task_status.started()

    async def _spawn(self, index: int) -> tuple[trio.Process, int]:
        """Start worker `index` on the shared sockets; returns it and its ready pipe."""
        read, write = os.pipe()
        fds = (*(sock.fileno() for sock in self.sockets), write)
        env = {
            **os.environ,
            ENV_INDEX: str(index),
            ENV_FDS: ",".join(map(str, fds)),
            ENV_PARENT: str(os.getpid()),
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "mesh_trio"], env=env, pass_fds=fds
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        self.processes[index] = process
        log.info("worker %d started (pid %d)", index, process.pid)
        if self.stopping:  # the signal came while it was being started
            process.send_signal(signal.SIGTERM)
        return process, read

    async def _stop(self, signum: int) -> None:
        """Forward `signum` to every worker and wait for them, bounded (then `_kill_remaining`)."""
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signum)
        with trio.move_on_after(self.config.graceful_timeout + STOP_MARGIN):
            for process in list(self.processes.values()):
                await process.wait()

    async def _kill_remaining(self) -> None:
        for index, process in self.processes.items():
            if process.returncode is None:
                log.warning("worker %d (pid %d) did not stop in time: killed", index, process.pid)
                process.kill()
                await process.wait()


async def _ready(fd: int) -> bool:
    """Whether the worker wrote to its ready pipe (False: it exited first). Closes `fd`."""
    async with trio.lowlevel.FdStream(fd) as stream:
        return await stream.receive_some(1) == b"r"


def describe(status: int) -> str:
    """`exited with status 3` / `was killed by SIGKILL`, from a `Popen.returncode`."""
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
