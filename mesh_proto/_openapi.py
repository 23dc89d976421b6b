"""The OpenAPI 3.1 document of the mesh API, generated from the route table.

`openapi_document(prefix, role=...)` walks `ROUTES` and describes each row with the schemas of
this module, which restate the parsers' rules (`_requests.py`) and the reply shapes as JSON
Schema (2020-12, the dialect of OpenAPI 3.1). Each port serves the document of its own routes at
`OPENAPI_PATH`; without a role the document holds both ports' routes, each operation tagged with
the ports that serve it (a route both ports serve, such as `GET {prefix}/mesh/{id}`, is one
operation with both tags, since its path, method and replies are the same on either).

The document is a plain dict of JSON values, built fresh on every call: the runtime builds it
once at start, `tools/gen_docs.py` writes the checked-in copy, and a test keeps that current.
A 405 is not per operation (it is any method a path has no operation for), so it is described
once, as the component response `MethodNotAllowed` with its `Allow` header.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from ._requests import (
    CURSOR_PATTERN,
    FORBIDDEN_KEYS,
    MAX_LIMIT,
    MAX_TIMEOUT,
    MAX_WAIT,
    TIMESTAMP_PATTERN,
)
from ._routing import ROUTES, Op, Role, normalize_prefix
from ._status import ALIASES, Status

OPENAPI_PATH: Final = "/openapi.json"

_NAME_PATTERN: Final = "^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
_MAX_OFFSET: Final = 10**18 - 1  # `offset` is at most 18 decimal digits
_STATUSES: Final = [status.value for status in Status]
_JSON: Final = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _reply(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description}
    if schema is not None:
        reply["content"] = {_JSON: {"schema": schema}}
    return reply


def _error(description: str) -> dict[str, Any]:
    return _reply(description, _ref("Error"))


_SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "description": "The body of every error reply.",
    },
    "Status": {"type": "string", "enum": _STATUSES},
    "Envelope": {
        "type": "object",
        "required": ["id", "status", "created_at", "updated_at", "data"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": _ref("Status"),
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "data": {"type": "object"},
        },
    },
    "EnvelopeList": {
        "type": "object",
        "required": ["messages", "total"],
        "properties": {
            "messages": {"type": "array", "items": _ref("Envelope")},
            "total": {"type": "integer", "minimum": 0},
            "next_cursor": {
                "type": "string",
                "pattern": f"^{CURSOR_PATTERN}$",
                "description": "Present when another page follows: pass it as `cursor`.",
            },
        },
        "description": "One page, newest first; `total` counts every match of the filters.",
    },
    "Created": {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string", "format": "uuid"}},
    },
    "CreateBody": {
        "type": "object",
        "properties": {
            "payload": {"description": "Any JSON value, handed to the first actor."},
            "headers": {"type": ["object", "null"]},
            "timeout": {
                "type": ["number", "null"],
                "minimum": 0,
                "maximum": MAX_TIMEOUT,
                "description": "Seconds until the envelope fails as timed out; 0 for none.",
            },
            **{key: False for key in FORBIDDEN_KEYS},
        },
        "description": "An empty body means `{}`. The route is the mesh's to set: "
        + ", ".join(f"`{key}`" for key in FORBIDDEN_KEYS)
        + " are refused.",
    },
    "StatusEvent": {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"const": "status"},
            "status": {
                "type": "string",
                "enum": _STATUSES + list(ALIASES),
                "description": "The sidecar aliases "
                + ", ".join(f"`{alias}`" for alias in ALIASES)
                + " mean `running`.",
            },
            "data": {"type": ["object", "null"], "description": "Merged into the stored data."},
        },
    },
    "FlyEvent": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"const": "fly"},
            "data": {"description": "Any JSON value; published, never stored."},
        },
    },
    "Event": {"oneOf": [_ref("StatusEvent"), _ref("FlyEvent")]},
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    },
    "Ready": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ready"}},
    },
}

_STATUS_NAMES: Final = "(" + "|".join(_STATUSES) + ")"
_TIMESTAMP: Final = {"type": "string", "format": "date-time", "pattern": f"^{TIMESTAMP_PATTERN}$"}


def _described(param: dict[str, Any], description: str) -> dict[str, Any]:
    return {**param, "description": description}


_ID: Final = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "An envelope id: a canonical (lower-case) UUID; anything else is a 404.",
    "schema": {"type": "string", "format": "uuid"},
}


def _query(name: str, schema: dict[str, Any], *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


_SSE_DESCRIPTION: Final = (
    "The envelope's events as Server-Sent Events. The first frame is `event: status` with the"
    " envelope as GET returns it; then `event: status` frames carry each stored change (the"
    " event data with `status` set) and `event: fly` frames each FLY event's data, every"
    " `data:` one line of JSON. A `:keepalive` comment is sent while nothing happens. The"
    " stream ends after the terminal status."
)

# What each operation adds to its route row: parameters, body, replies (404 / 503 where the
# operation reads an envelope or the store).
_OPERATIONS: Final[dict[Op, dict[str, Any]]] = {
    Op.CREATE: {
        "parameters": [
            _query("actor", {"type": "string", "pattern": _NAME_PATTERN}, required=True),
            _query("namespace", {"type": "string", "pattern": _NAME_PATTERN}),
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "Makes the create idempotent: a retry with the same key, actor, namespace"
                    " and body bytes answers 201 with the first create's id and dispatches"
                    " nothing; the key is remembered for ASYA_MESH_IDEMPOTENCY_TTL (24 h)."
                ),
                "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
            },
        ],
        "requestBody": {"content": {_JSON: {"schema": _ref("CreateBody")}}},
        "responses": {
            "201": {
                **_reply("Created and dispatched to the actor's queue.", _ref("Created")),
                "headers": {
                    "Location": {
                        "description": "The new envelope's path, `{prefix}/mesh/{id}`.",
                        "schema": {"type": "string"},
                    }
                },
            },
            "400": _error("Invalid actor, namespace, body or Idempotency-Key."),
            "413": _error("Body over 10 MiB."),
            "422": _error("The Idempotency-Key was used by a different request."),
            "501": _error("Idempotency-Key with a state proxy that lacks create-if-absent."),
            "503": _error("The store or the queue is unavailable."),
        },
        "links": ("201", "id", "$response.body#/id"),
    },
    Op.LIST: {
        "parameters": [
            _described(
                _query("actor", {"type": "string", "pattern": _NAME_PATTERN}),
                "Only envelopes created for this actor.",
            ),
            _described(
                _query(
                    "status",
                    {"type": "string", "pattern": f"^{_STATUS_NAMES}(,{_STATUS_NAMES})*$"},
                ),
                "Only envelopes in one of these comma-separated statuses.",
            ),
            _described(
                _query("created_after", _TIMESTAMP), "Only envelopes created after (exclusive)."
            ),
            _described(
                _query("created_before", _TIMESTAMP),
                "Only envelopes created before (exclusive).",
            ),
            _described(
                _query("cursor", {"type": "string", "pattern": f"^{CURSOR_PATTERN}$"}),
                "The `next_cursor` of the previous page: the page continues strictly after its"
                " last row, whatever was created since. Not with an `offset` above 0.",
            ),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            _query("offset", {"type": "integer", "minimum": 0, "maximum": _MAX_OFFSET}),
        ],
        "responses": {
            "200": _reply("A page of envelopes.", _ref("EnvelopeList")),
            "400": _error("Invalid actor, status, timestamp, cursor, limit or offset."),
            "503": _error("The store is unavailable."),
        },
    },
    Op.GET: {
        "parameters": [
            _ID,
            _described(
                _query("wait", {"type": "number", "minimum": 0, "maximum": MAX_WAIT}),
                "Hold the reply until the envelope is terminal, at most this many seconds, then"
                " answer with its state as it is; 0 or absent: at once.",
            ),
        ],
        "responses": {
            "200": _reply("The envelope.", _ref("Envelope")),
            "400": _error("Invalid wait."),
            "404": _error("No such envelope."),
            "503": _error("The store is unavailable."),
        },
    },
    Op.CANCEL: {
        "parameters": [_ID],
        "responses": {
            "204": _reply("Canceled, or already terminal (left as it is)."),
            "404": _error("No such envelope."),
            "503": _error("The store is unavailable."),
        },
    },
    Op.STREAM: {
        "parameters": [_ID],
        "responses": {
            "200": {
                "description": _SSE_DESCRIPTION,
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            "404": _error("No such envelope."),
            "503": _error("The store is unavailable."),
        },
    },
    Op.PUBLISH: {
        "parameters": [_ID],
        "requestBody": {"required": True, "content": {_JSON: {"schema": _ref("Event")}}},
        "responses": {
            "204": _reply("Stored and published, or stale (neither)."),
            "400": _error("Invalid event."),
            "404": _error("No such envelope."),
            "413": _error("Body over 10 MiB."),
            "503": _error("The store is unavailable."),
        },
    },
    Op.HEALTH: {"responses": {"200": _reply("The process runs.", _ref("Health"))}},
    Op.READY: {
        "responses": {
            "200": _reply("The store answers.", _ref("Ready")),
            "503": _error("The store does not answer."),
        }
    },
}

# Where a create's `id` leads (OpenAPI links, for readers and stateful testers).
_LINKED: Final = {Op.GET: "getEnvelope", Op.CANCEL: "cancelEnvelope"}
_OPERATION_IDS: Final = {
    Op.CREATE: "createEnvelope",
    Op.LIST: "listEnvelopes",
    Op.GET: "getEnvelope",
    Op.CANCEL: "cancelEnvelope",
    Op.STREAM: "streamEvents",
    Op.PUBLISH: "publishEvent",
    Op.HEALTH: "health",
    Op.READY: "ready",
}


def _operation(op: Op, summary: str, tags: list[str], linked: list[str]) -> dict[str, Any]:
    extra = _OPERATIONS[op]
    operation: dict[str, Any] = {
        "operationId": _OPERATION_IDS[op],
        "summary": summary,
        "tags": tags,
    }
    for key in ("parameters", "requestBody"):
        if key in extra:
            operation[key] = extra[key]
    responses = {code: dict(reply) for code, reply in extra["responses"].items()}
    if "links" in extra:
        code, name, expression = extra["links"]
        responses[code]["links"] = {
            target: {"operationId": target, "parameters": {name: expression}} for target in linked
        }
    operation["responses"] = responses
    return operation


def _openapi_operation(tags: list[str]) -> dict[str, Any]:
    return {
        "operationId": "openapi",
        "summary": "this document",
        "tags": tags,
        "responses": {"200": _reply("The OpenAPI document of this port.", {"type": "object"})},
    }


def openapi_document(prefix: str, *, role: Role | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of one port's routes (`role`), or of both (None), under
    `prefix` (normalised as `Router` does).

    Pure: returns a new dict of JSON values on every call; never raises for any prefix.
    """
    prefix = normalize_prefix(prefix)
    roles = list(Role) if role is None else [role]
    tags = [r.value for r in roles]
    specs = [spec for spec in ROUTES if spec.role in roles]
    served = {spec.op for spec in specs}
    linked = [target for op, target in _LINKED.items() if op in served]
    paths: dict[str, dict[str, Any]] = {}
    for spec in specs:
        assert isinstance(spec.op, Op)  # the core's table holds only core operations
        path = spec.pattern if spec.bare else prefix + spec.pattern
        item = paths.setdefault(path, {})
        method = spec.method.lower()
        if method in item:
            item[method]["tags"].append(spec.role.value)
            continue
        item[method] = _operation(spec.op, spec.summary, [spec.role.value], linked)
    paths[OPENAPI_PATH] = {"get": _openapi_operation(tags)}
    ports = " and ".join(f"the {tag} port" for tag in tags)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "asya mesh API",
            "version": "1",
            "description": (
                f"The envelope-lifecycle API of an actor mesh: the routes of {ports}"
                " (each operation's tags name the ports that serve it). HEAD is answered"
                " wherever GET is; any other method on a known path is a 405 with `Allow`"
                " (components.responses.MethodNotAllowed), an unknown path a 404, and a body"
                ' over 10 MiB a 413; every error body is `{"error": message}`.'
            ),
        },
        "tags": [{"name": tag, "description": f"served on the {tag} port"} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "responses": {
                "MethodNotAllowed": {
                    "description": "The path is known, the method is not.",
                    "headers": {
                        "Allow": {
                            "description": "The path's methods, comma-separated.",
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {_JSON: {"schema": _ref("Error")}},
                }
            },
        },
    }
    return copy.deepcopy(document)
