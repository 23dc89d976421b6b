"""The SQS transport: SigV4 against AWS's published examples, then real exchanges.

Signing is checked three ways: AWS's documented example values (the IAM `ListUsers` example
and the Signature Version 4 test suite's `get-vanilla` cases), botocore's signer on an SQS
request with a session token, and moto's server with IAM authentication switched on, which
recomputes the signature of every request and refuses a wrong one. (moto does not check
signatures otherwise: the other moto tests would pass with any key.)

Behaviour is checked against moto's SQS server (send/receive, missing queue, server gone, URL
cache, 200 concurrent sends) and against `FakeSqs` for what moto cannot show: connection reuse,
the connection limit, timeouts, a connection lost after the request was written, error replies.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from mesh_trio._config import ConfigError
from mesh_trio.transports import ActorNotFound, DispatchUnavailable
from mesh_trio.transports._sqs import (
    Credentials,
    SqsDispatcher,
    SqsServiceError,
    canonical_request,
    open_sqs_dispatcher,
    sign_v4,
    signing_key,
)
from tests.sqs_helpers import (
    CLOSE_AFTER,
    DROP,
    HANG,
    FakeSqs,
    create_queue,
    delete_queue,
    fake_sqs,
    moto_endpoint,
    queue_depth,
    queue_name,
    receive_bodies,
    self_signed_cert,
)

# The example credentials and time AWS uses throughout its SigV4 documentation.
EXAMPLE = Credentials(
    access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
)
EXAMPLE_TIME = datetime.datetime(2015, 8, 30, 12, 36, 0, tzinfo=datetime.UTC)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
KEYS = {"access_key": "AKIDTEST", "secret_key": "test-secret"}


# -- SigV4 -------------------------------------------------------------------------------------


def test_signing_key_matches_the_documented_derivation() -> None:
    key = signing_key(EXAMPLE.secret_key, "20150830", "us-east-1", "iam")
    assert key.hex() == "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"


def test_iam_list_users_example_signs_as_documented() -> None:
    content_type = ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")
    query = [("Action", "ListUsers"), ("Version", "2010-05-08")]
    text, signed = canonical_request(
        method="GET",
        path="/",
        query=query,
        headers=[content_type, ("Host", "iam.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")],
        payload_hash=EMPTY_SHA256,
    )
    assert text == (
        "GET\n/\nAction=ListUsers&Version=2010-05-08\n"
        "content-type:application/x-www-form-urlencoded; charset=utf-8\n"
        "host:iam.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
        f"content-type;host;x-amz-date\n{EMPTY_SHA256}"
    )
    assert signed == "content-type;host;x-amz-date"
    assert (
        hashlib.sha256(text.encode()).hexdigest()
        == "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
    )
    added = sign_v4(
        method="GET",
        host="iam.amazonaws.com",
        path="/",
        query=query,
        headers=[content_type],
        payload=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="iam",
        now=EXAMPLE_TIME,
    )
    assert added == [
        ("X-Amz-Date", "20150830T123600Z"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date, "
            "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        ),
    ]


@pytest.mark.parametrize(
    ("method", "query", "signature"),
    [
        ("GET", [], "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        # get-vanilla-query-order-key-case: parameters are sorted before signing.
        (
            "GET",
            [("Param2", "value2"), ("Param1", "value1")],
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        ("POST", [], "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ],
    ids=["get-vanilla", "get-vanilla-query-order-key-case", "post-vanilla"],
)
def test_sigv4_test_suite(method: str, query: list[tuple[str, str]], signature: str) -> None:
    added = sign_v4(
        method=method,
        host="example.amazonaws.com",
        path="/",
        query=query,
        headers=[],
        payload=b"",
        credentials=EXAMPLE,
        region="us-east-1",
        service="service",
        now=EXAMPLE_TIME,
    )
    assert dict(added)["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={signature}"
    )


def test_sqs_request_with_session_token_signs_like_botocore() -> None:
    pytest.importorskip("botocore")
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    creds = Credentials(access_key="ASIAEXAMPLE", secret_key="s3cr3t", session_token="tok+en/=")
    payload = json.dumps({"QueueUrl": "https://q/1/x", "MessageBody": '{ "a":  1 }'}).encode()
    headers = [
        ("Content-Type", "application/x-amz-json-1.0"),
        ("X-Amz-Target", "AmazonSQS.SendMessage"),
    ]
    now = datetime.datetime(2024, 2, 29, 23, 59, 59, tzinfo=datetime.UTC)
    added = sign_v4(
        method="POST",
        host="sqs.eu-west-1.amazonaws.com",
        path="/",
        headers=headers,
        payload=payload,
        credentials=creds,
        region="eu-west-1",
        service="sqs",
        now=now,
    )
    ours = dict(added)
    assert ours["X-Amz-Security-Token"] == "tok+en/="
    assert "x-amz-security-token" in ours["Authorization"]

    request = AWSRequest(
        method="POST",
        url="https://sqs.eu-west-1.amazonaws.com/",
        data=payload,
        headers=dict(headers + [(k, v) for k, v in added if k != "Authorization"]),
    )
    request.context["timestamp"] = "20240229T235959Z"
    auth = SigV4Auth(BotoCredentials("ASIAEXAMPLE", "s3cr3t", "tok+en/="), "sqs", "eu-west-1")
    theirs = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    assert ours["Authorization"].endswith(f"Signature={theirs}")


# -- settings ----------------------------------------------------------------------------------


async def test_credentials_come_from_the_standard_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    async with open_sqs_dispatcher("eu-central-1") as sqs:
        assert sqs.credentials == Credentials(
            access_key="AKIDENV", secret_key="env-secret", session_token="env-token"
        )
        assert sqs.endpoint == "https://sqs.eu-central-1.amazonaws.com"
        assert "env-secret" not in repr(sqs.credentials)
        assert "env-token" not in repr(sqs.credentials)
    async with open_sqs_dispatcher("cn-north-1", **KEYS) as sqs:
        assert sqs.endpoint == "https://sqs.cn-north-1.amazonaws.com.cn"
        assert sqs.credentials.session_token is None  # explicit keys never mix with the env

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        async with open_sqs_dispatcher("eu-central-1"):
            pass
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        async with open_sqs_dispatcher("eu-central-1"):
            pass


@pytest.mark.parametrize(
    ("region", "endpoint", "match"),
    [
        ("", None, "ASYA_SQS_REGION"),
        ("us-east-1", "ftp://127.0.0.1:21", "ASYA_SQS_ENDPOINT"),
        ("us-east-1", "127.0.0.1:9324", "ASYA_SQS_ENDPOINT"),
        ("us-east-1", "http://127.0.0.1:notaport", "ASYA_SQS_ENDPOINT"),
    ],
)
async def test_bad_settings_stop_startup(region: str, endpoint: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        async with open_sqs_dispatcher(region, endpoint=endpoint, **KEYS):
            pass


# -- against moto's SQS server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    pytest.importorskip("moto.server")
    with moto_endpoint() as (endpoint, _stop):
        yield endpoint


@pytest.fixture
async def sqs(moto: str) -> AsyncIterator[SqsDispatcher]:
    async with open_sqs_dispatcher("us-east-1", endpoint=moto, **KEYS) as dispatcher:
        yield dispatcher


async def test_send_puts_exactly_the_body_on_the_queue(sqs: SqsDispatcher) -> None:
    name = queue_name()
    url = await create_queue(sqs, name)
    body = json.dumps(
        {"id": "6f1c", "route": {"prev": [], "curr": "echo", "next": []}, "payload": "héllo ✓ \n"},
        ensure_ascii=False,
    ).encode()

    await sqs.send(name, body)

    with trio.fail_after(5):
        assert await receive_bodies(sqs, url, 1) == [body.decode()]
    assert await queue_depth(sqs, url) == 0
    assert sqs.statistics().messages_sent == 1


async def test_missing_queue_is_actor_not_found(sqs: SqsDispatcher) -> None:
    with pytest.raises(ActorNotFound):
        await sqs.send(queue_name("asya-nowhere"), b"{}")
    # A failed lookup is not cached: the next send asks again.
    with pytest.raises(ActorNotFound):
        await sqs.send(queue_name("asya-nowhere"), b"{}")
    assert sqs.statistics().queue_url_lookups == 2
    assert sqs.statistics().queue_urls_cached == 0


async def test_a_name_no_queue_can_have_is_actor_not_found_without_asking(
    sqs: SqsDispatcher,
) -> None:
    for name in ["asya-ns-a/b", "asya-ns-ä", "", "x" * 81]:
        with pytest.raises(ActorNotFound):
            await sqs.send(name, b"{}")
    assert sqs.statistics().requests == 0


async def test_server_gone_is_dispatch_unavailable_fast() -> None:
    with moto_endpoint() as (endpoint, stop):
        async with open_sqs_dispatcher("us-east-1", endpoint=endpoint, **KEYS) as sqs:
            name = queue_name()
            await create_queue(sqs, name)
            await sqs.send(name, b"{}")
            await trio.to_thread.run_sync(stop)

            with trio.fail_after(1), pytest.raises(DispatchUnavailable, match="cannot connect"):
                await sqs.send(name, b"{}")
            with trio.fail_after(1), pytest.raises(DispatchUnavailable, match="cannot connect"):
                await sqs.send(queue_name(), b"{}")


async def test_queue_url_cache_is_dropped_when_the_queue_goes(sqs: SqsDispatcher) -> None:
    name = queue_name()
    url = await create_queue(sqs, name)
    await sqs.send(name, b'"one"')
    await sqs.send(name, b'"two"')
    assert sqs.statistics().queue_url_lookups == 1  # the second send used the cached URL

    await delete_queue(sqs, url)
    # SendMessage to the cached URL fails, the URL is dropped, the lookup fails too.
    with pytest.raises(ActorNotFound):
        await sqs.send(name, b'"lost"')
    assert sqs.statistics().queue_url_lookups == 2
    assert sqs.statistics().queue_urls_cached == 0

    url = await create_queue(sqs, name)
    await sqs.send(name, b'"three"')
    assert sqs.statistics().queue_url_lookups == 3
    with trio.fail_after(5):
        assert await receive_bodies(sqs, url, 1) == ['"three"']


async def test_200_concurrent_sends_make_200_distinct_messages(sqs: SqsDispatcher) -> None:
    name = queue_name()
    url = await create_queue(sqs, name)
    bodies = [json.dumps({"n": n}) for n in range(200)]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for body in bodies:
                nursery.start_soon(sqs.send, name, body.encode())
        received = await receive_bodies(sqs, url, 200)

    assert sorted(received) == sorted(bodies)
    assert await queue_depth(sqs, url) == 0  # and nothing twice
    stats = sqs.statistics()
    assert stats.messages_sent == 200
    assert stats.queue_url_lookups == 1  # concurrent sends to one name share one lookup


async def test_moto_with_iam_auth_accepts_our_signature_and_refuses_a_wrong_one(
    moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    def make_user() -> dict[str, str]:
        # IAM set-up through another client: the part under test is SQS, not IAM.
        iam = boto3.client(
            "iam", endpoint_url=moto, region_name="us-east-1", **_boto_keys("AKIDSETUP")
        )
        user = queue_name("sender")
        iam.create_user(UserName=user)
        policy = {"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}
        iam.put_user_policy(
            UserName=user,
            PolicyName="sqs",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        key: dict[str, str] = iam.create_access_key(UserName=user)["AccessKey"]
        return key

    key = await trio.to_thread.run_sync(make_user)
    # From here on moto recomputes the signature of every request (in-process setting).
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)

    good = {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
    async with open_sqs_dispatcher("us-east-1", endpoint=moto, **good) as sqs:
        name = queue_name()
        url = await create_queue(sqs, name)
        await sqs.send(name, b'{"signed": true}')
        with trio.fail_after(5):
            assert await receive_bodies(sqs, url, 1) == ['{"signed": true}']

    bad = {"access_key": key["AccessKeyId"], "secret_key": "not-the-secret"}
    async with open_sqs_dispatcher("us-east-1", endpoint=moto, **bad) as sqs:
        with pytest.raises(SqsServiceError) as caught:
            await sqs.send(name, b"{}")
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.status == 403
    assert not caught.value.throttled


def _boto_keys(access_key: str) -> dict[str, str]:
    return {"aws_access_key_id": access_key, "aws_secret_access_key": "setup-secret"}


# -- against FakeSqs ---------------------------------------------------------------------------


async def test_connections_are_kept_alive_and_reused() -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        url = fake.create("asya-ns-echo")
        for n in range(20):
            await sqs.send("asya-ns-echo", str(n).encode())
        assert fake.messages[url] == [str(n) for n in range(20)]
        assert fake.connections == 1
        assert sqs.statistics().connections_opened == 1
        assert sqs.statistics().connections_idle == 1


async def test_connections_are_limited() -> None:
    async with fake_sqs() as fake, _open(fake, max_connections=2) as sqs:
        url = fake.create("asya-ns-echo")
        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(sqs.send, "asya-ns-echo", str(n).encode())
        assert sorted(fake.messages[url], key=int) == [str(n) for n in range(30)]
        assert fake.connections <= 2


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        url = fake.create("asya-ns-echo")
        fake.on_send = CLOSE_AFTER
        await sqs.send("asya-ns-echo", b"1")
        with trio.fail_after(1):
            await fake.closed.wait()
        fake.on_send = None
        await sqs.send("asya-ns-echo", b"2")
        assert fake.messages[url] == ["1", "2"]
        assert fake.actions() == ["GetQueueUrl", "SendMessage", "SendMessage"]
        assert fake.connections == 2


async def test_no_reply_in_time_is_unavailable_and_not_retried() -> None:
    async with fake_sqs() as fake, _open(fake, timeout=0.3) as sqs:
        fake.create("asya-ns-slow")
        fake.on_send = HANG
        with trio.fail_after(2), pytest.raises(DispatchUnavailable, match=r"no reply within 0\.3s"):
            await sqs.send("asya-ns-slow", b"{}")
        assert fake.actions() == ["GetQueueUrl", "SendMessage"]


async def test_connection_lost_after_the_request_was_written_is_not_retried() -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        url = fake.create("asya-ns-echo")
        await sqs.send("asya-ns-echo", b"1")  # leaves a pooled connection
        fake.on_send = DROP
        with pytest.raises(DispatchUnavailable, match="after the request was sent"):
            await sqs.send("asya-ns-echo", b"2")
        assert fake.actions() == ["GetQueueUrl", "SendMessage", "SendMessage"]
        assert fake.connections == 1
        assert fake.messages[url] == ["1"]


async def test_cancelled_send_closes_its_connection() -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        url = fake.create("asya-ns-echo")
        fake.on_send = HANG
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sqs.send, "asya-ns-echo", b"1")
            with trio.fail_after(1):
                await fake.hanging.wait()
            nursery.cancel_scope.cancel()
        fake.on_send = None
        await sqs.send("asya-ns-echo", b"2")  # on a new connection: the old one is not reused
        assert fake.messages[url] == ["2"]
        assert sqs.statistics().connections_opened == 2


@pytest.mark.parametrize(
    ("status", "error_type", "text", "throttled"),
    [
        (500, "InternalError", "SQS failed SendMessage \\(HTTP 500\\): InternalError", False),
        (503, "ServiceUnavailable", "SQS failed SendMessage \\(HTTP 503\\)", False),
        (400, "ThrottlingException", "SQS throttled SendMessage", True),
        (400, "RequestThrottled", "SQS throttled SendMessage", True),
        (429, "TooManyRequests", "SQS throttled SendMessage", True),
        (403, "AccessDenied", "SQS refused SendMessage \\(HTTP 403\\): AccessDenied", False),
    ],
)
async def test_error_replies_are_unavailable_and_not_retried(
    status: int, error_type: str, text: str, throttled: bool
) -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        fake.create("asya-ns-echo")
        fake.on_send = (status, error_type)
        with pytest.raises(SqsServiceError, match=text) as caught:
            await sqs.send("asya-ns-echo", b"{}")
        assert (caught.value.status, caught.value.code) == (status, error_type)
        assert caught.value.throttled is throttled
        assert fake.actions() == ["GetQueueUrl", "SendMessage"]


async def test_stale_cached_url_is_looked_up_again_once() -> None:
    async with fake_sqs() as fake, _open(fake) as sqs:
        first = fake.create("asya-ns-echo", generation=1)
        await sqs.send("asya-ns-echo", b"1")
        second = fake.create("asya-ns-echo", generation=2)  # same name, new URL
        await sqs.send("asya-ns-echo", b"2")
        assert fake.messages == {first: ["1"], second: ["2"]}
        sent_to = [doc.get("QueueUrl") for action, doc in fake.log if action == "SendMessage"]
        assert fake.actions() == [
            *["GetQueueUrl", "SendMessage"],
            *["SendMessage", "GetQueueUrl", "SendMessage"],
        ]
        assert sent_to == [first, first, second]

        del fake.queues["asya-ns-echo"]
        fake.log.clear()
        with pytest.raises(ActorNotFound):
            await sqs.send("asya-ns-echo", b"3")
        assert fake.actions() == ["SendMessage", "GetQueueUrl"]


async def test_https_endpoint_with_keep_alive(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl tool to make a certificate")
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async with fake_sqs(server_context) as fake:
        url = fake.create("asya-ns-echo")
        endpoint = f"https://localhost:{fake.port}"
        async with open_sqs_dispatcher(
            "us-east-1", endpoint=endpoint, ssl_context=trusting, **KEYS
        ) as sqs:
            for n in range(3):
                await sqs.send("asya-ns-echo", str(n).encode())
            assert fake.messages[url] == ["0", "1", "2"]
            assert sqs.statistics().connections_opened == 1

        # The system trust store does not know this certificate: refused before any request.
        async with open_sqs_dispatcher("us-east-1", endpoint=endpoint, **KEYS) as sqs:
            with pytest.raises(DispatchUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await sqs.send("asya-ns-echo", b"3")
        assert fake.messages[url] == ["0", "1", "2"]


async def test_a_closed_dispatcher_refuses_to_send() -> None:
    async with fake_sqs() as fake:
        fake.create("asya-ns-echo")
        async with _open(fake) as sqs:
            await sqs.send("asya-ns-echo", b"1")
        assert sqs.statistics().connections_idle == 0
        with pytest.raises(DispatchUnavailable, match="closed"):
            await sqs.send("asya-ns-echo", b"2")


def _open(
    fake: FakeSqs, *, timeout: float = 5.0, max_connections: int = 10
) -> AbstractAsyncContextManager[SqsDispatcher]:
    return open_sqs_dispatcher(
        "us-east-1",
        endpoint=f"http://127.0.0.1:{fake.port}",
        timeout=timeout,
        max_connections=max_connections,
        **KEYS,
    )
