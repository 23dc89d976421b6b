"""Idempotent create (`Idempotency-Key` on `POST {prefix}/mesh/`), as values and decisions.

A create that carries a key first *claims* it: it stores a `Claim` (the new envelope's id, a
fingerprint of the request, and when the claim expires) at `claim_key(K)`, atomically and only
if no live claim is stored there, and only then stores and dispatches the envelope. Whoever
finds a claim already stored decides with `decide_claim`: the same fingerprint is a retry
(`REPLAY`: answer with the stored id, dispatch nothing), another fingerprint is a misuse
(`CONFLICT`, 422), an expired claim counts as none (`EXPIRED`: claim again).

The fingerprint is the SHA-256 of the actor, the namespace the envelope is dispatched to, and
the exact body bytes. The body is not canonicalised: a retry resends the bytes it sent before,
and comparing them is exact and costs no second parse of a body of up to 10 MiB; a client that
re-encodes its body differently gets a 422, never a silent duplicate.

`claim_envelope` is the claim through the state proxy, a procedure like `update_status`: a
create-if-absent write (``PUT ?if_absent=1``, the `IF_ABSENT` feature), and on 409 a read; an
expired claim is replaced under the revision guard (``if_rev``), so two replacers cannot both
win.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Generator
from datetime import datetime
from typing import Any, Final

import attrs

from ._envelope import REVISION_KEY
from ._errors import BadRequest, ClientError, ServiceError, StoreProtocolError
from ._json import loads
from ._store import StoreReply, StoreRequest, _fail, check_write, get_request, put_request
from ._time import format_time, parse_time
from ._wire import encode_key

#: The request header, and the longest key it may carry.
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY: Final = 255
#: Where claims are stored: ``idem/`` and the key, percent-encoded by `encode_key`.
CLAIM_PREFIX: Final = "idem/"
#: How long a claim lives unless configured (``ASYA_MESH_IDEMPOTENCY_TTL``), in seconds.
DEFAULT_IDEMPOTENCY_TTL: Final = 24 * 3600.0
# A claim is replaced only when it expired, and each replacement is progress for one writer.
_MAX_CLAIM_ATTEMPTS: Final = 16
_VISIBLE_ASCII: Final = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}")


class KeyReused(ClientError):
    """The key was claimed by a create with another fingerprint (422)."""

    status_hint = 422

    def __init__(self) -> None:
        super().__init__("Idempotency-Key reused with a different request")


class IdempotencyUnsupported(ClientError):
    """The store cannot claim atomically (a state proxy without `IF_ABSENT`): 501.

    A `ClientError` although 5xx: nothing was changed, the request cannot succeed by retrying,
    and it is not logged per request (the store warns once).
    """

    status_hint = 501


class ClaimDecision(enum.Enum):
    FRESH = "fresh"  # no claim stored: this create owns the key
    REPLAY = "replay"  # the same request claimed it: answer with its id
    CONFLICT = "conflict"  # another request claimed it: 422
    EXPIRED = "expired"  # the stored claim is past its time: claim again


def parse_idempotency_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` header: 1-255 visible ASCII characters.

    Raises:
        BadRequest: empty, too long, or holding a space, a control or a non-ASCII character.
    """
    if not _VISIBLE_ASCII.fullmatch(value):
        raise BadRequest(
            f"{IDEMPOTENCY_HEADER} must be 1-{MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        )
    return value


def request_fingerprint(actor: str, namespace: str, body: bytes) -> str:
    """The SHA-256 (hex) of a create: actor, namespace and the exact body bytes.

    Actor and namespace are validated names (no newline), so the newlines keep the three apart.
    """
    digest = hashlib.sha256(f"{actor}\n{namespace}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def claim_key(key: str) -> str:
    """The store key of an idempotency key's claim."""
    return CLAIM_PREFIX + encode_key(key)


@attrs.frozen(kw_only=True)
class Claim:
    """A stored claim: the envelope it names, the request's fingerprint, its expiry.

    `revision` only matters through the state proxy, where an expired claim is replaced under
    the revision guard; the stored value carries it (as ``_rev``) only once it is not 0.
    """

    envelope_id: str
    fingerprint: str
    expires_at: datetime
    revision: int = 0

    def to_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {
            "envelope_id": self.envelope_id,
            "fingerprint": self.fingerprint,
            "expires_at": format_time(self.expires_at),
        }
        if self.revision:
            value[REVISION_KEY] = self.revision
        return value

    @classmethod
    def from_value(cls, value: object) -> Claim:
        """A claim from its stored value.

        Raises:
            StoreProtocolError: not a claim's value.
        """
        if isinstance(value, dict):
            envelope_id, fingerprint = value.get("envelope_id"), value.get("fingerprint")
            expires_at, revision = value.get("expires_at"), value.get(REVISION_KEY, 0)
            if (
                isinstance(envelope_id, str)
                and isinstance(fingerprint, str)
                and isinstance(expires_at, str)
                and type(revision) is int
            ):
                try:
                    moment = parse_time(expires_at)
                except ValueError:
                    pass
                else:
                    return cls(
                        envelope_id=envelope_id,
                        fingerprint=fingerprint,
                        expires_at=moment,
                        revision=revision,
                    )
        raise StoreProtocolError("stored idempotency claim is malformed")

    def expired(self, now: datetime) -> bool:
        return self.expires_at <= now


def decide_claim(stored: Claim | None, fingerprint: str, now: datetime) -> ClaimDecision:
    """What a create with `fingerprint` does, given the claim stored for its key (or None)."""
    if stored is None:
        return ClaimDecision.FRESH
    if stored.expired(now):
        return ClaimDecision.EXPIRED
    if stored.fingerprint != fingerprint:
        return ClaimDecision.CONFLICT
    return ClaimDecision.REPLAY


def claim_envelope(
    key: str, claim: Claim, now: datetime
) -> Generator[StoreRequest, StoreReply, Claim | None]:
    """Claim `key` (a `claim_key`) through a state proxy with `IF_ABSENT`.

    Returns None when `claim` was stored (no live claim was there), else the live stored claim.

    Raises:
        ServiceError: the proxy is unavailable, or the claim kept changing under us.
        StoreProtocolError: the proxy answered outside the protocol.
    """
    absent = True
    for _ in range(_MAX_CLAIM_ATTEMPTS):
        if absent:
            reply = yield put_request(key, claim.to_value(), if_absent=True)
            if check_write(reply):
                return None
        reply = yield get_request(key)
        absent = reply.status == 404  # released in between: claim again
        if absent:
            continue
        if reply.status != 200:
            raise _fail(reply, "get")
        row = loads(reply.body, error=StoreProtocolError, what="store reply")
        stored = Claim.from_value(row.get("value") if isinstance(row, dict) else None)
        if not stored.expired(now):
            return stored
        replacement = attrs.evolve(claim, revision=stored.revision + 1)
        if check_write((yield put_request(key, replacement.to_value(), if_rev=stored.revision))):
            return None
    raise ServiceError(f"idempotency claim {key} is changing too fast")
