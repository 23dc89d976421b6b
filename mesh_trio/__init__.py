"""mesh_trio: the trio runtime of the mesh API.

Two hypercorn listeners (external: clients; internal: sidecars) over one `Mesh` of operations,
one SSE `Hub`, a `Store` (embedded memory/SQLite or the state proxy) and a `Dispatcher`
(in-process, RabbitMQ or SQS). `serve()` owns them all; `asya-mesh-api` runs it.
"""

from ._asgi import log_error, read_body, send_response, serve_lifespan
from ._config import Config, ConfigError, parse_duration
from ._dispatch import ActorNotFound, Dispatcher, DispatchError, DispatchUnavailable, MemoryQueues
from ._hub import Hub, HubStatistics, Subscription
from ._mesh import Mesh, SseDialect
from ._server import Bound, serve
from ._store import MemoryStore, SqliteStore, Store

__all__ = [
    "ActorNotFound",
    "Bound",
    "Config",
    "ConfigError",
    "DispatchError",
    "DispatchUnavailable",
    "Dispatcher",
    "Hub",
    "HubStatistics",
    "MemoryQueues",
    "MemoryStore",
    "Mesh",
    "SqliteStore",
    "SseDialect",
    "Store",
    "Subscription",
    "log_error",
    "parse_duration",
    "read_body",
    "send_response",
    "serve",
    "serve_lifespan",
]
