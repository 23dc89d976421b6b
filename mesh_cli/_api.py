"""The mesh API's external port, as the CLI sees it: one httpx client, errors mapped at the edge.

Every call either returns decoded JSON (or SSE events) or raises `CliError`, whose `exit_status`
says whose fault it was: 2 for a request the API refused (4xx) or one that could not be made (a
bad URL), 4 for the server's side (5xx, unreachable, cut off, an answer that is not JSON). The
command layer prints `CliError.message` as one line and exits with that status.

The event stream is read with `client.stream` and parsed by `mesh_proto.SseParser`, so frames
come out as they arrive; it has no read timeout, because a quiet stream is normal (the server
sends a keepalive comment after each silence of `ASYA_MESH_SSE_KEEPALIVE`).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import quote

import httpx

from mesh_proto import SseEvent, SseParser

EXIT_CLIENT: Final = 2  # usage errors and 4xx answers
EXIT_SERVER: Final = 4  # 5xx answers, connection errors, malformed answers

_TIMEOUT: Final = httpx.Timeout(10.0)
_STREAM_TIMEOUT: Final = httpx.Timeout(10.0, read=None)


class CliError(Exception):
    """A failed command: `message` is the one line to print, `exit_status` the process status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status


@contextmanager
def _mapped(url: str) -> Iterator[None]:
    """Turn httpx's exceptions into `CliError`s naming the URL."""
    try:
        yield
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise CliError(f"bad URL {url!r}: {exc}", EXIT_CLIENT) from None
    except httpx.TimeoutException:
        raise CliError(f"{url}: no answer in time", EXIT_SERVER) from None
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach {url}: {exc or type(exc).__name__}", EXIT_SERVER) from None


def _refusal(response: httpx.Response) -> CliError:
    """The error of a 4xx/5xx answer, with the API's `{"error": ...}` message when it has one."""
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:200] or response.reason_phrase
    status = EXIT_CLIENT if response.status_code < 500 else EXIT_SERVER
    return CliError(f"HTTP {response.status_code}: {message}", status)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CliError(
            f"HTTP {response.status_code}: the answer is not JSON: {response.text[:200]!r}",
            EXIT_SERVER,
        ) from None


class MeshApi:
    """A client of one mesh API (`base_url` is the prefix, e.g. `http://host:8080/api/v1`)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(timeout=_TIMEOUT)

    def close(self) -> None:
        self._client.close()

    def _url(self, envelope_id: str | None = None, suffix: str = "") -> str:
        if envelope_id is None:
            return f"{self.base_url}/mesh/"
        return f"{self.base_url}/mesh/{quote(envelope_id, safe='')}{suffix}"

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        with _mapped(url):
            response = self._client.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise _refusal(response)
        return response

    def create(self, actor: str, body: dict[str, Any], namespace: str | None = None) -> str:
        """Create an envelope; returns its id."""
        params = {"actor": actor} | ({"namespace": namespace} if namespace is not None else {})
        reply = _json(self._request("POST", self._url(), params=params, json=body))
        if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
            raise CliError(f"create answered without an id: {reply!r}", EXIT_SERVER)
        return str(reply["id"])

    def get(self, envelope_id: str) -> dict[str, Any]:
        return dict(_json(self._request("GET", self._url(envelope_id))))

    def list(self, status: str | None, limit: int | None, offset: int | None) -> dict[str, Any]:
        params = {
            k: v
            for k, v in (("status", status), ("limit", limit), ("offset", offset))
            if v is not None
        }
        return dict(_json(self._request("GET", self._url(), params=params)))

    def cancel(self, envelope_id: str) -> None:
        self._request("DELETE", self._url(envelope_id))

    def events(self, envelope_id: str) -> Generator[SseEvent, None, None]:
        """The envelope's SSE events as they arrive, until the server ends the stream."""
        url = self._url(envelope_id, "/events")
        parser = SseParser()
        with (
            _mapped(url),
            self._client.stream(
                "GET", url, headers={"accept": "text/event-stream"}, timeout=_STREAM_TIMEOUT
            ) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _refusal(response)
            for chunk in response.iter_bytes():
                yield from parser.feed(chunk)


def frame_data(event: SseEvent) -> Any:
    """An event's `data` decoded from JSON (the server always sends JSON; else the text)."""
    try:
        return json.loads(event.data)
    except ValueError:
        return event.data
