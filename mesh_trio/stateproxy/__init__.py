"""asya-state-proxy: the state-proxy protocol over a Unix socket, stored in PostgreSQL.

`serve_state_proxy` runs the whole sidecar in a trio task (tests of the mesh API start it with
``nursery.start``); the `asya-state-proxy` console script (`_cli.main`) runs it from the
environment. See docs/stateproxy.md for the protocol, the filter semantics and the driver.
"""

from ._errors import BadRequest, StartupError, StateProxyError, StoreUnavailable
from ._query import CompiledQuery, compile_query
from ._server import DEFAULT_POOL_SIZE, MAX_BODY, serve_state_proxy
from ._settings import Settings, SettingsError, parse_index_spec

__all__ = [
    "DEFAULT_POOL_SIZE",
    "MAX_BODY",
    "BadRequest",
    "CompiledQuery",
    "Settings",
    "SettingsError",
    "StartupError",
    "StateProxyError",
    "StoreUnavailable",
    "compile_query",
    "parse_index_spec",
    "serve_state_proxy",
]
