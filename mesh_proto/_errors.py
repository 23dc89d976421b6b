"""Errors that carry their own reply.

Every failure the core reports is a `ProtocolError` with a `status_hint`: the HTTP status a
runtime answers with, and `body()` the `{"error": ...}` JSON of the contract. Client mistakes
(`ClientError`, 4xx) are kept apart from faults of our own or of a dependency
(`ServiceError`, 5xx), so a runtime logs the latter and never the former.
"""

from __future__ import annotations

import json


class ProtocolError(Exception):
    """Base of every error the core raises; `status_hint` is the HTTP status to answer."""

    status_hint: int = 500

    def __init__(
        self,
        message: str,
        *,
        status_hint: int | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_hint is not None:
            self.status_hint = status_hint
        self.headers = headers

    def body(self) -> bytes:
        """The contract's error body, `{"error": "<message>"}`."""
        return json.dumps({"error": self.message}).encode()


class ClientError(ProtocolError):
    """The request is wrong; nothing was changed. Defaults to 400."""

    status_hint = 400


class BadRequest(ClientError):
    status_hint = 400


class NotFound(ClientError):
    status_hint = 404


class Unsupported(ClientError):
    """The request needs something this deployment lacks (e.g. a state proxy feature): 501.

    A `ClientError` although 5xx: nothing was changed and a retry cannot succeed.
    """

    status_hint = 501


class MethodNotAllowed(ClientError):
    """Known path, wrong method; `headers` carries the `Allow` header."""

    status_hint = 405

    def __init__(self, allowed: tuple[str, ...]) -> None:
        super().__init__("method not allowed", headers=(("allow", ", ".join(allowed)),))
        self.allowed = allowed


class PayloadTooLarge(ClientError):
    status_hint = 413


class ServiceError(ProtocolError):
    """A dependency (store, broker) failed; the request may be retried later. Defaults to 503."""

    status_hint = 503


class StoreProtocolError(ServiceError):
    """The state proxy answered something the protocol does not allow."""

    status_hint = 502
