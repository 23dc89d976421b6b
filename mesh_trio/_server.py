"""`serve()`: one trio process, two HTTP listeners, and what they share.

The listeners are `ASYA_MESH_HTTP`'s: `lean` runs `serve_lean` on each port with its
`MeshHandler`; `hypercorn` runs the quart app on the external port and the same internal
`MeshHandler` behind an ASGI adapter on the internal one (docs/runtime.md).

Ownership (structured concurrency): `serve()` opens the store, the dispatcher and the one
`Broadcaster` (`open_broadcaster`: the in-process hub), and owns a nursery with both listeners
plus the background tasks (deadline backstop, demo actors). `task_status.started(Bound)` is
called only once both ports listen.

Shutdown is an ordered drain, triggered by `shutdown_trigger` returning:

1. the broadcaster closes: every open SSE stream sends what it has pending and ends cleanly;
2. the listeners stop accepting; in-flight requests get `graceful_timeout` to finish;
3. background tasks are cancelled; then the dispatcher and the store close; last, the
   OpenTelemetry exporter (when `OTEL_EXPORTER_OTLP_ENDPOINT` is set) flushes and stops.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial
from typing import Any, cast

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from mesh_proto import MAX_BODY, Role, ServiceError

from ._asgi import InternalApp
from ._backstop import run_backstop
from ._broadcast import Broadcaster
from ._bus import SINGLE_REPLICA, open_proxy_broadcaster
from ._config import Config, ConfigError, StartupError, root_cause
from ._demo import run_demo_actors
from ._extension import Extensions
from ._handler import MeshHandler
from ._hub import Hub
from ._lean import serve_lean
from ._mesh import Mesh
from ._metrics import MeshMetrics, MeteredStore
from ._observability import TracedStore, open_tracing
from ._proxy_store import ProxyStore
from ._retention import Purging, run_retention
from ._store import Store, open_embedded_store
from ._web import external_app
from .transports import MemoryQueues, open_transport

log = logging.getLogger("mesh_trio")


@attrs.frozen
class Bound:
    """Where the listeners ended up (ports resolved when 0 was asked for)."""

    external_port: int
    internal_port: int
    mesh: Mesh = attrs.field(eq=False, repr=False)


def hypercorn_config(
    host: str,
    port: int,
    *,
    graceful_timeout: float,
    access_log: bool,
    sock: socket.socket | None = None,
) -> Any:
    config = HypercornConfig()
    if sock is not None:  # a listening socket made by a supervisor (`ASYA_MESH_WORKERS`)
        config.bind = [f"fd://{sock.fileno()}"]
    else:
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    # The default (1000) would cut a sidecar's long-lived connection every 1000 events.
    config.keep_alive_max_requests = 2**62
    # The default (100) makes a burst of thousands of SSE connects take far longer.
    config.backlog = 4096
    # The access log costs 10-20 % of throughput: off unless asked for.
    config.accesslog = logging.getLogger("hypercorn.access") if access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    return config


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Store]:
    if config.state_proxy_socket is not None:
        from ._proxy_store import open_proxy_store

        async with open_proxy_store(config.state_proxy_socket) as store:
            yield store
    else:
        async with open_embedded_store(config.store) as embedded:
            yield embedded


@asynccontextmanager
async def open_broadcaster(config: Config, store: object) -> AsyncIterator[Broadcaster]:
    """The fan-out of published frames, closed when the context ends (`_broadcast.py`).

    `store` is the one `open_store` yielded. Through a state proxy that advertises the event
    bus, the replicated broadcaster (`_bus.py`): every replica on the same PostgreSQL sees
    every event. Through one without it (the Go proxy), the in-process hub and one warning:
    streams then see only the events posted to this replica. The embedded stores: the hub.
    A proxy that does not answer yet is taken for one with the bus (the broadcaster checks
    again once it answers).
    """
    if isinstance(store, ProxyStore) and config.state_proxy_socket is not None:
        with suppress(ServiceError):
            await store.ping()
        if store.features is None or store.has_events:
            # The bus's buffer serves replays: the local hub keeps none.
            local = Hub(buffer=0, buffer_age=config.event_buffer_age)
            async with open_proxy_broadcaster(store, config.state_proxy_socket, local) as bus:
                yield bus
            return
        log.warning(SINGLE_REPLICA)
    hub = Hub(buffer=config.event_buffer, buffer_age=config.event_buffer_age)
    try:
        yield hub
    finally:
        hub.close()


def _port(binds: list[str]) -> int:
    return int(binds[0].rsplit(":", 1)[1])


def _open_listener(
    config: Config, variable: str, sock: socket.socket | None
) -> trio.SocketListener:
    """The lean listener's socket: the supervisor's `sock`, else one bound to `config.host` and
    the port `variable` sets, as a supervisor binds it (one socket for the host's first
    address, like hypercorn's).

    Raises:
        StartupError: the host does not resolve or the port cannot be bound, naming the setting.
    """
    if sock is None:
        from ._workers import listen  # _workers imports this module

        port = (
            config.internal_port if variable == "ASYA_MESH_INTERNAL_PORT" else config.external_port
        )
        sock = listen(config.host, port, variable)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _start_lean(
    nursery: trio.Nursery,
    handler: MeshHandler,
    config: Config,
    variable: str,
    stop: trio.Event,
    sock: socket.socket | None,
) -> list[str]:
    """Start the lean listener of one port; returns its binds (as hypercorn names them)."""
    listener = _open_listener(config, variable, sock)
    host, port = listener.socket.getsockname()[:2]
    await nursery.start(
        partial(
            serve_lean,
            handler,
            [listener],
            max_body=MAX_BODY,
            keepalive_timeout=config.keepalive_timeout,
            header_timeout=config.header_timeout,
            graceful_timeout=config.graceful_timeout,
            shutdown_trigger=stop.wait,
            error_headers=handler.refusal_headers,
        )
    )
    return [f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"]


async def _start_listener(
    nursery: trio.Nursery,
    listen: Callable[..., Awaitable[Any]],
    app: Any,
    settings: Callable[..., Any],
    config: Config,
    variable: str,
    sock: socket.socket | None = None,
) -> list[str]:
    """Start one listener on `config.host` and the port `variable` sets; returns its binds.

    Raises:
        StartupError: the host does not resolve or the port cannot be bound (in use, not
            allowed), naming the setting.
    """
    host = config.host
    port = config.internal_port if variable == "ASYA_MESH_INTERNAL_PORT" else config.external_port
    try:
        binds: list[str] = await nursery.start(listen, app, settings(host, port, sock=sock))
    except (OSError, BaseExceptionGroup) as exc:
        cause = root_cause(exc)
        if isinstance(cause, socket.gaierror):
            raise StartupError(f"ASYA_MESH_HOST={host!r}: {cause.strerror}") from cause
        if isinstance(cause, OSError):
            raise StartupError(
                f"{variable}={port}: cannot listen on {host}:{port}: {cause.strerror}"
            ) from cause
        raise
    return binds


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
    sockets: tuple[socket.socket, socket.socket] | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the mesh API until `shutdown_trigger` returns (forever if None), then drain.

    `sockets` are listening sockets (external, internal) to serve instead of binding the
    configured ports: a supervisor's, shared by its workers.
    """
    ext_sock, int_sock = sockets if sockets is not None else (None, None)
    if config.transport != "memory" and config.internal_url is None:
        raise ConfigError(
            "ASYA_INTERNAL_URL: required with a real queue transport (sidecars post events there)"
        )
    async with AsyncExitStack() as stack:
        # Entered first, so it is left last: spans of the drain are still exported.
        otel = await stack.enter_async_context(open_tracing(os.environ))
        store: Store = await stack.enter_async_context(open_store(config))
        # The retention sweep uses the store itself, not the metered and traced one: its
        # batches are not API calls. Every store `open_store` yields can purge.
        purging = cast(Purging, store)
        metrics = MeshMetrics()
        metrics.watch_store(store)
        store = MeteredStore(store, metrics)
        if otel is not None:
            store = TracedStore(store, otel)
        dispatcher = await stack.enter_async_context(open_transport(config))
        broadcaster = await stack.enter_async_context(open_broadcaster(config, purging))
        metrics.watch_broadcaster(broadcaster)
        mesh = Mesh(
            store=store,
            dispatcher=dispatcher,
            broadcaster=broadcaster,
            namespace=config.namespace,
            gateway_url=config.internal_url,
            keepalive=config.sse_keepalive,
            idempotency_ttl=config.idempotency_ttl,
            sse_retry=config.sse_retry,
            tracing=config.tracing,
            otel=otel,
            metrics=metrics,
        )
        router = config.router
        # Extension modules (mesh_compat with ASYA_MESH_COMPAT=1) are imported by name only here.
        routes = Extensions.load(config.extensions, mesh, router)
        # On hypercorn the access log is hypercorn's (it serves the internal handler too).
        handler_log = config.access_log and config.http == "lean"
        internal = MeshHandler(mesh, routes, Role.INTERNAL, access_log=handler_log)
        stop_listeners = trio.Event()
        settings = partial(
            hypercorn_config,
            graceful_timeout=config.graceful_timeout,
            access_log=config.access_log,
        )
        async with trio.open_nursery() as nursery:
            if config.http == "lean":
                external = MeshHandler(
                    mesh,
                    routes,
                    Role.EXTERNAL,
                    cors_origins=config.cors_origins,
                    access_log=handler_log,
                )
                ext_binds = await _start_lean(
                    nursery, external, config, "ASYA_MESH_EXTERNAL_PORT", stop_listeners, ext_sock
                )
                int_binds = await _start_lean(
                    nursery, internal, config, "ASYA_MESH_INTERNAL_PORT", stop_listeners, int_sock
                )
            else:
                listen = partial(hypercorn_serve, shutdown_trigger=stop_listeners.wait)
                app = external_app(mesh, routes, cors_origins=config.cors_origins)
                ext_binds = await _start_listener(
                    nursery, listen, app, settings, config, "ASYA_MESH_EXTERNAL_PORT", ext_sock
                )
                int_binds = await _start_listener(
                    nursery,
                    listen,
                    InternalApp(internal),
                    settings,
                    config,
                    "ASYA_MESH_INTERNAL_PORT",
                    int_sock,
                )
            bound = Bound(_port(ext_binds), _port(int_binds), mesh)
            if mesh.gateway_url is None:
                mesh.gateway_url = f"http://127.0.0.1:{bound.internal_port}"
            async with trio.open_nursery() as workers:
                workers.start_soon(run_backstop, mesh, config.backstop_interval)
                workers.start_soon(mesh.run_keepalives)
                if config.retention is not None:
                    retention = partial(
                        run_retention,
                        purging,
                        metrics,
                        retention=config.retention,
                        interval=config.retention_interval,
                        clock=mesh.clock,
                    )
                    workers.start_soon(retention)
                if config.demo_actors and isinstance(dispatcher, MemoryQueues):
                    workers.start_soon(
                        partial(
                            run_demo_actors,
                            dispatcher,
                            namespace=config.namespace,
                            internal_port=bound.internal_port,
                            prefix=router.prefix,
                        )
                    )
                log.info(
                    "mesh API listening: external %s, internal %s (store: %s, transport: %s)",
                    ext_binds[0],
                    int_binds[0],
                    "state proxy " + config.state_proxy_socket
                    if config.state_proxy_socket
                    else config.store,
                    config.transport,
                )
                task_status.started(bound)
                if shutdown_trigger is None:
                    await trio.sleep_forever()
                else:
                    await shutdown_trigger()
                log.info("shutting down: closing streams, draining requests")
                broadcaster.close()
                stop_listeners.set()
                workers.cancel_scope.cancel()
    log.info("mesh API stopped")
