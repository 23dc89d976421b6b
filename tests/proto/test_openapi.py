"""The OpenAPI document: every route of the table, schemas that agree with the parsers, and a
checked-in copy that is current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from mesh_proto import (
    OPENAPI_PATH,
    ROUTES,
    BadRequest,
    CreateRequest,
    ListQuery,
    Role,
    Router,
    openapi_document,
    parse_event,
    parse_wait,
)
from mesh_proto._requests import Cursor

from ._support import ID, T0, envelope, gen_docs

ROOT = Path(__file__).resolve().parents[2]


def schema(document: dict[str, Any], name: str) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


@pytest.mark.parametrize("role", [Role.EXTERNAL, Role.INTERNAL, None], ids=repr)
@pytest.mark.parametrize("prefix", ["", "/", "api/v1/", "/gw/mesh-api"], ids=repr)
def test_every_route_of_the_port_and_nothing_else(prefix: str, role: Role | None) -> None:
    document = openapi_document(prefix, role=role)
    validate(document)
    router = Router(prefix)
    expected = {
        (router.path(spec, "{id}"), spec.method.lower())
        for spec in ROUTES
        if role is None or spec.role is role
    } | {(OPENAPI_PATH, "get")}
    listed = {(path, method) for path, item in document["paths"].items() for method in item}
    assert listed == expected
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_operations_are_tagged_with_the_ports_that_serve_them() -> None:
    paths = openapi_document("/api/v1")["paths"]
    assert paths["/api/v1/mesh/{id}"]["get"]["tags"] == ["external", "internal"]
    assert paths["/health"]["get"]["tags"] == ["external", "internal"]
    assert paths["/api/v1/mesh/{id}/events"]["get"]["tags"] == ["external"]
    assert paths["/api/v1/mesh/{id}/events"]["post"]["tags"] == ["internal"]
    assert paths[OPENAPI_PATH]["get"]["tags"] == ["external", "internal"]
    internal = openapi_document("/api/v1", role=Role.INTERNAL)
    assert [tag["name"] for tag in internal["tags"]] == ["internal"]


def test_links_lead_from_create_to_the_operations_of_its_id() -> None:
    created = openapi_document("/api/v1", role=Role.EXTERNAL)["paths"]["/api/v1/mesh/"]["post"]
    links = created["responses"]["201"]["links"]
    assert links == {
        "getEnvelope": {"operationId": "getEnvelope", "parameters": {"id": "$response.body#/id"}},
        "cancelEnvelope": {
            "operationId": "cancelEnvelope",
            "parameters": {"id": "$response.body#/id"},
        },
    }


def test_the_stream_is_described_as_server_sent_events() -> None:
    paths = openapi_document("/api/v1", role=Role.EXTERNAL)["paths"]
    reply = paths["/api/v1/mesh/{id}/events"]["get"]["responses"]["200"]
    assert list(reply["content"]) == ["text/event-stream"]
    for word in ("event: status", "event: fly", ":keepalive"):
        assert word in reply["description"]


def test_every_error_reply_has_the_error_body() -> None:
    document = openapi_document("/api/v1")
    codes = set()
    for item in document["paths"].values():
        for operation in item.values():
            for code, reply in operation["responses"].items():
                if code.startswith(("4", "5")):
                    codes.add(code)
                    assert reply["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
    assert codes == {"400", "404", "413", "422", "501", "503"}
    allowed = document["components"]["responses"]["MethodNotAllowed"]
    assert "Allow" in allowed["headers"]
    assert schema(document, "Error").is_valid({"error": "method not allowed"})
    assert not schema(document, "Error").is_valid({"message": "x"})


def test_each_call_returns_a_new_document() -> None:
    first = openapi_document("/api/v1")
    first["components"]["schemas"]["Error"]["required"].append("x")
    first["paths"]["/health"]["get"]["tags"].append("x")
    assert openapi_document("/api/v1") == json.loads(json.dumps(openapi_document("/api/v1")))
    assert openapi_document("/api/v1") != first


def accepted(parse: Any, *args: Any) -> bool:
    try:
        parse(*args)
    except BadRequest:
        return False
    return True


CREATE_BODIES = [
    {},
    {"payload": [1, {"a": None}]},
    {"payload": None, "headers": {"x": "y"}, "timeout": 1.5},
    {"headers": None, "timeout": None},
    {"timeout": 0},
    {"unknown": 1},
    {"timeout": -1},
    {"timeout": "5"},
    {"timeout": 1e12},
    {"headers": []},
    {"headers": "x"},
    {"route": None},
    {"route_next": []},
    {"next": "a"},
    [],
    "x",
]


@pytest.mark.parametrize("body", CREATE_BODIES, ids=json.dumps)
def test_the_create_body_schema_agrees_with_the_parser(body: Any) -> None:
    valid = schema(openapi_document(""), "CreateBody").is_valid(body)
    assert valid == accepted(CreateRequest.parse, "actor=a", json.dumps(body).encode())


EVENTS = [
    {"type": "status", "status": "running"},
    {"type": "status", "status": "processing", "data": {"a": 1}},
    {"type": "status", "status": "succeeded", "data": None},
    {"type": "fly", "data": [1, 2]},
    {"type": "fly"},
    {"type": "status"},
    {"type": "status", "status": "done"},
    {"type": "status", "status": "running", "data": []},
    {"type": "other"},
    {"status": "running"},
    [],
]


@pytest.mark.parametrize("event", EVENTS, ids=json.dumps)
def test_the_event_schema_agrees_with_the_parser(event: Any) -> None:
    valid = schema(openapi_document(""), "Event").is_valid(event)
    assert valid == accepted(parse_event, json.dumps(event).encode())


QUERIES = {
    "actor": ["a", "a-b.c_d", "A" * 63, "", "-a", "a" * 64, "a b"],
    "status": ["running", "canceled", "Running", "done", "running,paused", "running,", ","],
    "created_after": [
        "2026-11-28T14:24:06Z",
        "2026-11-28T14:24:06.123456+01:00",
        "2026-11-28T14:24:06+05:53:28",
        "2026-11-28T14:24:06",
        "2026-11-28",
        "yesterday",
    ],
    "created_before": ["2026-11-28T14:24:06.5Z", "2026-11-28 14:24:06Z", "2026-11-28t14:24:06Z"],
    "cursor": [
        Cursor(created_at=T0, id=ID).encode(),
        "0." + ID,
        ID,
        "1." + ID.upper(),
        "x." + ID,
        "1" * 18 + "." + ID,
    ],
    "limit": [1, 1000, 0, 1001],
    "offset": [0, 10**18 - 1, -1, 10**18],
}

WAITS = [0, 0.5, 60, 1.5e-07, -1, 60.5, "abc"]


def parameter(document: dict[str, Any], path: str, method: str, name: str) -> Any:
    for param in document["paths"][path][method]["parameters"]:
        if param["name"] == name:
            value = param["schema"]
            return Draft202012Validator({**value, "components": document["components"]})
    raise AssertionError(f"no parameter {name}")


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in QUERIES.items() for value in values]
)
def test_query_parameters_agree_with_the_parsers(name: str, value: Any) -> None:
    document = openapi_document("")
    if name == "actor":
        valid = parameter(document, "/mesh/", "post", name).is_valid(value)
        assert valid == accepted(CreateRequest.parse, f"actor={value}", b"")
        namespace = parameter(document, "/mesh/", "post", "namespace").is_valid(value)
        assert namespace == accepted(CreateRequest.parse, f"actor=a&namespace={value}", b"")
        return
    valid = parameter(document, "/mesh/", "get", name).is_valid(value)
    assert valid == accepted(ListQuery.parse, f"{name}={quote(str(value), safe='')}")


@pytest.mark.parametrize("value", WAITS)
def test_the_wait_parameter_agrees_with_its_parser(value: Any) -> None:
    valid = parameter(openapi_document(""), "/mesh/{id}", "get", "wait").is_valid(value)
    assert valid == accepted(parse_wait, f"wait={value}")


def test_the_next_cursor_of_a_list_is_a_valid_cursor() -> None:
    token = ListQuery(limit=1).next_cursor([envelope(), envelope()])
    assert schema(openapi_document(""), "EnvelopeList").is_valid(
        {"messages": [], "total": 0, "next_cursor": token}
    )
    assert accepted(ListQuery.parse, f"cursor={token}")


def test_the_checked_in_document_is_current() -> None:
    checked_in = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert checked_in == gen_docs().render_openapi(), (
        "docs/openapi.json is stale: regenerate it with `python tools/gen_docs.py`"
    )
    assert json.loads(checked_in) == openapi_document("/api/v1")
