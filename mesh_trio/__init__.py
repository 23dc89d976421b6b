"""mesh_trio: the trio runtime of the mesh API.

Two hypercorn listeners (external: clients; internal: sidecars) over one `Mesh` of operations,
one `Broadcaster` of SSE frames (the in-process `Hub`), a `Store` (embedded memory/SQLite or the
state proxy) and a `Dispatcher` (in-process, RabbitMQ or SQS). `serve()` owns them all;
`asya-mesh-api` runs it. Extensions (`Extension`: the legacy routes of `mesh_compat`) add
routes to both ports through `ExtensionRoute`s.
"""

from ._broadcast import Broadcaster, BroadcastStatistics, Subscription
from ._config import Config, ConfigError, parse_duration
from ._extension import Extension, ExtensionReply, ExtensionRequest, ExtensionRoute
from ._hub import Hub
from ._mesh import Mesh, SseDialect
from ._server import Bound, serve
from ._store import MemoryStore, SqliteStore, Store
from .transports import ActorNotFound, Dispatcher, DispatchError, DispatchUnavailable, MemoryQueues

__all__ = [
    "ActorNotFound",
    "Bound",
    "BroadcastStatistics",
    "Broadcaster",
    "Config",
    "ConfigError",
    "DispatchError",
    "DispatchUnavailable",
    "Dispatcher",
    "Extension",
    "ExtensionReply",
    "ExtensionRequest",
    "ExtensionRoute",
    "Hub",
    "MemoryQueues",
    "MemoryStore",
    "Mesh",
    "SqliteStore",
    "SseDialect",
    "Store",
    "Subscription",
    "parse_duration",
    "serve",
]
