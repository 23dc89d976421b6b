"""The SQS transport of the dispatch seam, on the mesh API's HTTP client and our own SigV4.

How it works, bottom up:

- `sign_v4` is pure: method, path, query, headers, payload and a clock value in, the headers that
  make an AWS Signature Version 4 request out (`X-Amz-Date`, `X-Amz-Security-Token`,
  `Authorization`). It is checked against AWS's published examples in the tests.
- `HttpPool` (`mesh_trio._client`, on h11) holds keep-alive HTTP/1.1 connections
  to the one SQS endpoint (TCP, or TLS for `https`), at most `max_connections` at a time. An
  idle connection is reused unless the server closed it meanwhile or it sat idle for
  `_IDLE_LIMIT`; on any error or cancellation the connection is closed.
- `SqsDispatcher` speaks the SQS JSON protocol (`POST /`, `Content-Type:
  application/x-amz-json-1.0`, `X-Amz-Target: AmazonSQS.<Action>`): `send(queue, body)` looks
  the queue URL up once (`GetQueueUrl`, cached on success, one lookup in flight per name) and
  then calls `SendMessage`.

Failures map onto the two the HTTP contract knows. A missing queue is `ActorNotFound`; anything
that stops SQS from taking the message (refused or lost connection, timeout, 5xx, throttling,
credentials refused) is `DispatchUnavailable`, with the reason in its text. A message is never
written twice for one `send`: once a `SendMessage` request was fully written, a lost reply is
reported, not retried. Before that point (connecting failed, or a pooled connection found dead while
writing) the request goes out once more on a fresh connection (the client's retry rule). The one
other repeat is the missing-queue path: when `SendMessage` to a cached URL says the queue does not
exist (so nothing was enqueued), the cache entry is dropped, the URL looked up again, and the
message sent once more.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
import trio

from .._client import ConnectError, ExchangeError, HttpPool, HttpReply
from . import ActorNotFound, DispatchUnavailable

__all__ = [
    "Credentials",
    "SqsDispatcher",
    "SqsServiceError",
    "SqsStatistics",
    "canonical_request",
    "open_sqs_dispatcher",
    "sign_v4",
    "signing_key",
]

_JSON_CONTENT_TYPE = "application/x-amz-json-1.0"
_USER_AGENT = "asya-mesh-api-trio"
# A SQS reply is a few hundred bytes; anything far bigger is not SQS talking.
_MAX_REPLY_BYTES = 1 << 20
# Keep an idle connection at most this long: AWS front ends drop idle ones after about a minute,
# and a connection the server already dropped would cost a failed write before the retry.
_IDLE_LIMIT = 20.0
# Error codes (JSON `__type` short names and their query-protocol spellings) that mean the queue
# does not exist.
_MISSING_QUEUE_CODES = frozenset(
    {"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue"}
)
_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "KmsThrottled",
        "KMS.ThrottlingException",
    }
)
# SQS queue names: 1-80 of [A-Za-z0-9_-], FIFO queues end in `.fifo`. A name outside this can
# never exist, so it is answered without asking SQS.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}(\.fifo)?")


class SqsServiceError(DispatchUnavailable):
    """SQS answered a request with an error other than "the queue does not exist".

    Attributes:
        action: The SQS action, e.g. `SendMessage`.
        status: The HTTP status of the reply.
        code: The error code SQS gave (`ThrottlingException`, `AccessDenied`, ...), or `""`.
        throttled: True when SQS asked us to slow down (HTTP 429 or a throttling code).
    """

    def __init__(self, action: str, status: int, code: str, message: str) -> None:
        self.action = action
        self.status = status
        self.code = code
        self.throttled = status == 429 or code in _THROTTLING_CODES
        if self.throttled:
            what = f"SQS throttled {action}"
        elif status >= 500:
            what = f"SQS failed {action} (HTTP {status})"
        else:
            what = f"SQS refused {action} (HTTP {status})"
        detail = ": ".join(part for part in (code, message) if part)
        super().__init__(f"{what}: {detail}" if detail else what)


# -- AWS Signature Version 4 -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Credentials:
    """An AWS access key, as used to sign requests.

    Attributes:
        access_key: The access key id (`AKIA...`, `ASIA...`).
        secret_key: The secret access key; kept out of `repr`.
        session_token: The token that comes with temporary credentials, else None.
    """

    access_key: str
    secret_key: str = attrs.field(repr=False)
    session_token: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        """Read `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.

        Raises:
            ConfigError: The access key id or the secret key is missing or empty; the message
                names the variable (the CLI prints it as one line).
        """
        from .._config import ConfigError

        env = os.environ if environ is None else environ
        access_key = env.get("AWS_ACCESS_KEY_ID", "")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
        if not access_key:
            raise ConfigError("AWS_ACCESS_KEY_ID is not set (SQS requests must be signed)")
        if not secret_key:
            raise ConfigError("AWS_SECRET_ACCESS_KEY is not set (SQS requests must be signed)")
        return cls(
            access_key=access_key,
            secret_key=secret_key,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key: HMAC chain over date, region, service, `aws4_request`.

    Args:
        secret_key: The secret access key.
        date: The request's UTC date as `YYYYMMDD`.
        region: e.g. `us-east-1`.
        service: e.g. `sqs`.
    """
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def _uri_encode(text: str, *, keep_slash: bool = False) -> str:
    # SigV4 encodes every byte except the unreserved set A-Z a-z 0-9 - _ . ~
    return quote(text, safe="/-_.~" if keep_slash else "-_.~")


def _canonical_query(query: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((_uri_encode(k), _uri_encode(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """Return (canonical header block, signed header list) for the headers to sign."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        # Trim, and fold inner runs of spaces into one, as the canonical form asks.
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def canonical_request(
    *,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: Sequence[tuple[str, str]],
    payload_hash: str,
) -> tuple[str, str]:
    """Build the SigV4 canonical request; return it and the signed-header list.

    `path` is the decoded path (`/`, or e.g. `/ሴ`), encoded here once as the request line
    carries it; every header in `headers` is signed.
    """
    block, signed = _canonical_headers(headers)
    text = "\n".join(
        [
            method.upper(),
            _uri_encode(path or "/", keep_slash=True),
            _canonical_query(query),
            block,
            signed,
            payload_hash,
        ]
    )
    return text, signed


def sign_v4(
    *,
    method: str,
    host: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    payload: bytes,
    credentials: Credentials,
    region: str,
    service: str,
    now: datetime.datetime,
    query: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """Sign one request with AWS Signature Version 4 (authorization header form).

    Args:
        method: HTTP method.
        host: The `Host` header value (with `:port` when it is not the scheme's default).
        path: The decoded request path.
        headers: Further headers to sign (e.g. `Content-Type`, `X-Amz-Target`); `host`,
            `x-amz-date` and, with temporary credentials, `x-amz-security-token` are added.
        payload: The exact request body.
        credentials: Who signs.
        region: The region in the credential scope.
        service: The service in the credential scope (`sqs`).
        now: The signing time; naive values are taken as UTC.
        query: The decoded query parameters, if any.

    Returns:
        The headers to add to the request: `X-Amz-Date`, `X-Amz-Security-Token` (temporary
        credentials only) and `Authorization`.
    """
    if now.tzinfo is not None:
        now = now.astimezone(datetime.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    added = [("X-Amz-Date", amz_date)]
    if credentials.session_token:
        added.append(("X-Amz-Security-Token", credentials.session_token))
    to_sign = [("host", host), *headers, *added]
    request, signed = canonical_request(
        method=method,
        path=path,
        query=query,
        headers=to_sign,
        payload_hash=hashlib.sha256(payload).hexdigest(),
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()]
    )
    key = signing_key(credentials.secret_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return [*added, ("Authorization", authorization)]


# -- the SQS client ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SqsStatistics:
    """A snapshot of a dispatcher's counters.

    Attributes:
        connections_opened: TCP/TLS connections opened so far.
        connections_idle: Keep-alive connections waiting in the pool now.
        requests: HTTP requests written (retries on a fresh connection count again).
        queue_url_lookups: `GetQueueUrl` calls made.
        queue_urls_cached: Queue URLs held in the cache now.
        messages_sent: Messages SQS accepted.
    """

    connections_opened: int
    connections_idle: int
    requests: int
    queue_url_lookups: int
    queue_urls_cached: int
    messages_sent: int


def _error_of(reply: HttpReply) -> tuple[str, str]:
    """Return (code, message) of an error reply, whatever form it came in."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in reply.headers}
    code = ""
    message = ""
    try:
        doc = json.loads(reply.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        # `__type` is `com.amazonaws.sqs#QueueDoesNotExist` (some services add `:<url>`).
        code = str(doc.get("__type") or doc.get("code") or "").rpartition("#")[2]
        code = code.partition(":")[0]
        message = str(doc.get("message") or doc.get("Message") or "")
    elif reply.body:
        # The query protocol and some front ends answer XML; keep the code and message.
        text = reply.body.decode("utf-8", "replace")
        if match := re.search(r"<Code>([^<]*)</Code>", text):
            code = match.group(1)
        if match := re.search(r"<Message>([^<]*)</Message>", text):
            message = match.group(1)
    if not code:
        code = headers.get("x-amzn-errortype", "").partition(":")[0]
    query_code = headers.get("x-amzn-query-error", "").partition(";")[0]
    if query_code in _MISSING_QUEUE_CODES:
        code = query_code if code not in _MISSING_QUEUE_CODES else code
    return code, message[:300]


@attrs.define(eq=False)
class SqsDispatcher:
    """Sends wire messages to SQS queues by name. Open it with `open_sqs_dispatcher`.

    Attributes:
        region: The AWS region in the signing scope.
        endpoint: The endpoint URL requests go to.
        timeout: Seconds one HTTP request may take, from waiting for a pooled connection to the
            end of the reply.
    """

    region: str
    endpoint: str
    credentials: Credentials
    timeout: float
    _pool: HttpPool
    _host_header: str
    _path: str
    _urls: dict[str, str] = attrs.field(init=False, factory=dict)
    _lookups: dict[str, trio.Event] = attrs.field(init=False, factory=dict)
    _lookups_made: int = attrs.field(init=False, default=0)
    _sent: int = attrs.field(init=False, default=0)

    def statistics(self) -> SqsStatistics:
        """Return a snapshot of the counters."""
        pool = self._pool.statistics()
        return SqsStatistics(
            connections_opened=pool.connections_opened,
            connections_idle=pool.connections_idle,
            requests=pool.requests,
            queue_url_lookups=self._lookups_made,
            queue_urls_cached=len(self._urls),
            messages_sent=self._sent,
        )

    async def send(self, queue: str, body: bytes) -> None:
        """Put `body` on the SQS queue named `queue`; return once SQS accepted it.

        Args:
            queue: The queue name (`asya-{namespace}-{actor}`), not its URL.
            body: The message, UTF-8 text (SQS message bodies are strings).

        Raises:
            ActorNotFound: No queue has that name (nothing was enqueued).
            DispatchUnavailable: SQS could not be reached or did not take the message (refused
                connection, timeout, 5xx, throttling, credentials refused: `SqsServiceError`
                when SQS answered). The message may have been enqueued; it is not re-sent.
            ValueError: `body` is not UTF-8.
        """
        text = body.decode("utf-8")
        url, cached = await self._queue_url(queue)
        try:
            await self._send_to(url, text)
        except ActorNotFound:
            if not cached:
                raise
            # The queue at the cached URL is gone, so nothing was enqueued: forget the URL, look
            # the name up again once, and send there.
            if self._urls.get(queue) == url:
                del self._urls[queue]
            url, _ = await self._queue_url(queue)
            await self._send_to(url, text)

    async def _send_to(self, url: str, text: str) -> None:
        reply = await self.call("SendMessage", {"QueueUrl": url, "MessageBody": text})
        digest = hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()
        if reply.get("MD5OfMessageBody", digest) != digest:
            raise DispatchUnavailable("SQS stored a message whose MD5 differs from the one sent")
        self._sent += 1

    async def _queue_url(self, queue: str) -> tuple[str, bool]:
        """Return (URL of `queue`, whether it came from the cache)."""
        if not _QUEUE_NAME.fullmatch(queue):
            raise ActorNotFound(f"no SQS queue can be named {queue!r}")
        while (pending := self._lookups.get(queue)) is not None:
            # Another send is looking this name up: wait for it rather than asking SQS again.
            # If it failed or was cancelled, nothing is cached and we ask ourselves.
            await pending.wait()
        if (url := self._urls.get(queue)) is not None:
            return url, True
        done = self._lookups[queue] = trio.Event()
        try:
            self._lookups_made += 1
            reply = await self.call("GetQueueUrl", {"QueueName": queue}, idempotent=True)
            url = reply.get("QueueUrl")
            if not isinstance(url, str) or not url:
                raise DispatchUnavailable("SQS GetQueueUrl reply has no QueueUrl")
            self._urls[queue] = url
            return url, False
        finally:
            del self._lookups[queue]
            done.set()

    async def ping(self) -> None:
        """One cheap signed call (`ListQueues`, at most one result): the endpoint answers and
        accepts our credentials, or `DispatchUnavailable` says why not."""
        try:
            await self.call("ListQueues", {"MaxResults": 1}, idempotent=True)
        except ActorNotFound as exc:  # not a queue call: any error means "not usable"
            raise DispatchUnavailable(f"SQS ListQueues: {exc}") from None

    async def call(
        self, action: str, params: Mapping[str, Any], *, idempotent: bool = False
    ) -> dict[str, Any]:
        """Make one SQS JSON-protocol call, e.g. `call("CreateQueue", {"QueueName": "q"})`.

        Args:
            action: The SQS action name, sent as `X-Amz-Target: AmazonSQS.<action>`.
            params: The request document.
            idempotent: True lets a request that met a dead pooled connection go out again on a
                fresh one even if it had been fully written. Never set it for `SendMessage`.

        Returns:
            The reply document (`{}` for actions that answer nothing).

        Raises:
            ActorNotFound: SQS says the queue does not exist.
            SqsServiceError: SQS answered with any other error.
            DispatchUnavailable: No reply within `timeout`, or the connection failed.
        """
        payload = json.dumps(params, separators=(",", ":")).encode("utf-8")
        headers = [
            ("Content-Type", _JSON_CONTENT_TYPE),
            ("X-Amz-Target", f"AmazonSQS.{action}"),
        ]
        headers += sign_v4(
            method="POST",
            host=self._host_header,
            path=self._path,
            headers=headers,
            payload=payload,
            credentials=self.credentials,
            region=self.region,
            service="sqs",
            now=datetime.datetime.now(datetime.UTC),
        )
        headers = [("Host", self._host_header), ("User-Agent", _USER_AGENT), *headers]
        with trio.move_on_after(self.timeout) as scope:
            try:
                reply = await self._pool.request(
                    "POST", self._path, body=payload, headers=headers, idempotent=idempotent
                )
            except (ConnectError, ExchangeError) as exc:
                raise DispatchUnavailable(f"SQS {action}: {exc}") from exc
        if scope.cancelled_caught:
            raise DispatchUnavailable(f"SQS {action} got no reply within {self.timeout:g}s")
        if 200 <= reply.status < 300:
            if not reply.body.strip():
                return {}
            try:
                doc = json.loads(reply.body)
            except ValueError:
                doc = None
            if not isinstance(doc, dict):
                raise DispatchUnavailable(f"SQS {action} reply is not a JSON object")
            return doc
        code, message = _error_of(reply)
        if code in _MISSING_QUEUE_CODES:
            raise ActorNotFound(f"SQS {action}: the queue does not exist")
        raise SqsServiceError(action, reply.status, code, message)


def _default_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sqs.{region}.{suffix}"


@asynccontextmanager
async def open_sqs_dispatcher(
    region: str,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
    timeout: float = 5.0,
    max_connections: int = 10,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[SqsDispatcher]:
    """Open an SQS dispatcher; its pooled connections close when the block ends.

    No connection is made until the first `send`, so opening never fails on the network.

    Args:
        region: The AWS region (`ASYA_SQS_REGION`).
        endpoint: Where requests go (`ASYA_SQS_ENDPOINT`), `http://` or `https://`, e.g.
            `http://127.0.0.1:4566` for a local SQS. Default `https://sqs.{region}.amazonaws.com`.
        access_key: The access key id. With `access_key` and `secret_key` both None the key comes
            from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`; there is
            no lookup of shared config files or instance metadata.
        secret_key: The secret access key.
        session_token: The session token of temporary credentials (explicit keys only).
        timeout: Seconds each HTTP request may take, waiting for a connection included.
        max_connections: Connections open to SQS at most; further requests wait for one.
        ssl_context: TLS settings for an `https` endpoint (e.g. a private CA); default the
            system's trust store with hostname checks.

    Raises:
        ValueError: A setting is missing or malformed (the message names it).
    """
    if not region:
        raise ValueError("ASYA_SQS_REGION is empty: the SQS transport needs a region")
    if timeout <= 0:
        raise ValueError(f"SQS timeout must be positive, got {timeout!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
    if access_key is None and secret_key is None:
        credentials = Credentials.from_env()
    elif not access_key or not secret_key:
        raise ValueError("SQS credentials need both an access key and a secret key")
    else:
        credentials = Credentials(
            access_key=access_key, secret_key=secret_key, session_token=session_token or None
        )

    url = endpoint or _default_endpoint(region)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"ASYA_SQS_ENDPOINT must be an http:// or https:// URL, got {url!r}")
    try:
        explicit_port = parts.port
    except ValueError as exc:
        raise ValueError(f"ASYA_SQS_ENDPOINT has a bad port: {url!r}") from exc
    tls = parts.scheme == "https"
    port = explicit_port or (443 if tls else 80)
    host = parts.hostname
    host_in_header = f"[{host}]" if ":" in host else host
    host_header = host_in_header if explicit_port is None else f"{host_in_header}:{port}"

    if tls and ssl_context is None:
        ssl_context = ssl.create_default_context()
    pool = HttpPool(
        parts.scheme,
        host,
        explicit_port,
        ssl_context=ssl_context if tls else None,
        size=max_connections,
        timeout=None,  # `call` bounds each request and says which action timed out
        keepalive_expiry=_IDLE_LIMIT,
        max_reply=_MAX_REPLY_BYTES,
    )
    dispatcher = SqsDispatcher(
        region=region,
        endpoint=url,
        credentials=credentials,
        timeout=timeout,
        pool=pool,
        host_header=host_header,
        path=parts.path or "/",
    )
    try:
        yield dispatcher
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()
