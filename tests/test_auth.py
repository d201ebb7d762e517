"""Token verification through a real task_service process, in both modes.

- shared secret (BETTER_AUTH_SECRET, HS256 only);
- JWKS (AUTH_JWKS_URL, EdDSA/RS256/ES256), served by a real HTTP server in this test, with
  AUTH_ISSUER/AUTH_AUDIENCE enforced.
Every refusal is UNAUTHENTICATED with a `www-authenticate: Bearer ...` trailer, and a refused
call writes nothing. A `user_id` in the request that is not the token's `sub` is PERMISSION_DENIED.
A client reads only a generic "invalid or expired token"; the exact reason is in the service's
`audit` log record (found here by the call's x-request-id).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from common.auth import INVALID_TOKEN
from tests.conftest import BACKENDS
from tests.support import ROOT, SECRET, ServiceProcess, free_port, running, token
from todo.v1 import task_pb2, task_pb2_grpc

TIMEOUT = 30
ISSUER = "http://auth.example.test"
AUDIENCE = "http://app.example.test"
LEEWAY_SECONDS = 30  # the AUTH_LEEWAY_SECONDS default


# --- token making ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade_token(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    """A JWT built by hand, for tokens PyJWT refuses to make (alg none, HMAC with a PEM)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = _b64(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


def claims_for(user_id: str, ttl_seconds: int = 600, **changes: Any) -> dict[str, Any]:
    """Claims of a fresh token; a change to None drops that claim."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds, **changes}
    return {name: value for name, value in claims.items() if value is not None}


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        exporter: Any = {"EdDSA": OKPAlgorithm, "RS256": RSAAlgorithm, "ES256": ECAlgorithm}[self.alg]
        exported = exporter.to_jwk(self.private.public_key(), as_dict=True)
        return {**exported, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def sign(self, claims: dict[str, Any], kid: str | None = None, alg: str | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers={"kid": kid or self.kid})

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def new_keys(prefix: str) -> dict[str, SigningKey]:
    """One key per JWKS algorithm (kid = prefix-alg)."""
    return {
        "EdDSA": SigningKey(f"{prefix}-ed", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
        "RS256": SigningKey(f"{prefix}-rsa", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ES256": SigningKey(f"{prefix}-ec", "ES256", ec.generate_private_key(ec.SECP256R1())),
    }


# --- a JWKS endpoint, as Better Auth serves it -----------------------------------------


class JwksServer:
    """Serves {"keys": [...]} at /api/auth/jwks from a thread; keys can change, the endpoint can fail."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.failing = False
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                if self.path != "/api/auth/jwks" or owner.failing:
                    self.send_error(404 if self.path != "/api/auth/jwks" else 503)
                    return
                body = json.dumps({"keys": [key.jwk() for key in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/api/auth/jwks"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


# --- services --------------------------------------------------------------------------


def _start(
    backend: str, env: dict[str, str], make_url: Callable[[str, str], str], log_dir: Any
) -> Iterator[ServiceProcess]:
    address = f"127.0.0.1:{free_port()}"
    env = {**env, "TASK_SERVICE_ADDR": address, "TASK_DATABASE_URL": make_url(backend, "auth")}
    with running("task_service", env, address, log_dir) as service:
        yield service


@pytest.fixture(scope="module", params=BACKENDS)
def secret_service(
    request: pytest.FixtureRequest,
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Any,
) -> Iterator[ServiceProcess]:
    yield from _start(request.param, base_env, database_url_factory, log_dir)


@pytest.fixture(scope="module")
def jwks_keys() -> dict[str, SigningKey]:
    return new_keys("main")


@pytest.fixture(scope="module")
def jwks_server(jwks_keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    server = JwksServer(list(jwks_keys.values()))
    yield server
    server.close()


@pytest.fixture(scope="module", params=BACKENDS)
def jwks_service(
    request: pytest.FixtureRequest,
    jwks_server: JwksServer,
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Any,
) -> Iterator[ServiceProcess]:
    # BETTER_AUTH_SECRET stays set (base_env): JWKS mode must still refuse HS256 tokens made with it.
    env = {**base_env, "AUTH_JWKS_URL": jwks_server.url, "AUTH_ISSUER": ISSUER, "AUTH_AUDIENCE": AUDIENCE}
    yield from _start(request.param, env, database_url_factory, log_dir)


@dataclass
class Caller:
    """Calls TaskService with whatever `authorization` value a test hands it.

    Each call carries a fresh x-request-id, so the audit record of the last call can be found."""

    stub: task_pb2_grpc.TaskServiceStub
    service: ServiceProcess
    last_request_id: str = ""

    async def list(self, authorization: str | None, user_id: str = "") -> task_pb2.ListTasksResponse:
        return await self.stub.ListTasks(
            task_pb2.ListTasksRequest(user_id=user_id), metadata=self._metadata(authorization), timeout=TIMEOUT
        )

    async def create(self, authorization: str | None, title: str = "a task") -> task_pb2.Task:
        return await self.stub.CreateTask(
            task_pb2.CreateTaskRequest(title=title), metadata=self._metadata(authorization), timeout=TIMEOUT
        )

    def _metadata(self, authorization: str | None) -> tuple[tuple[str, str], ...]:
        self.last_request_id = uuid.uuid4().hex
        return (("x-request-id", self.last_request_id), *_metadata(authorization))

    def audit(self) -> dict[str, Any]:
        """The one audit record the service logged for the last call."""
        return one_audit_record(self.service, self.last_request_id)

    def reason(self) -> str:
        """Why the last call was refused, as the audit log says."""
        record = self.audit()
        assert record["event"] == "auth_refused", record
        return str(record["reason"])

    async def refused(self, authorization: str | None) -> grpc.aio.AioRpcError:
        """The error of a read and of a write with this authorization (they must agree)."""
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await self.list(authorization)
        with pytest.raises(grpc.aio.AioRpcError) as write:
            await self.create(authorization)
        assert read.value.code() == write.value.code(), (read.value, write.value)
        return read.value


def _metadata(authorization: str | None) -> tuple[tuple[str, str], ...]:
    return () if authorization is None else (("authorization", authorization),)


def bearer(value: str) -> str:
    return f"Bearer {value}"


def audit_records(service: ServiceProcess, request_id: str) -> list[dict[str, Any]]:
    records = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        if request_id in line and line.startswith("{"):
            record = json.loads(line)
            if record.get("logger") == "audit" and record.get("request_id") == request_id:
                records.append(record)
    return records


def one_audit_record(service: ServiceProcess, request_id: str) -> dict[str, Any]:
    records = audit_records(service, request_id)
    assert len(records) == 1, records
    return records[0]


@pytest.fixture
async def on_secret(secret_service: ServiceProcess) -> AsyncIterator[Caller]:
    async with grpc.aio.insecure_channel(secret_service.address) as channel:
        yield Caller(task_pb2_grpc.TaskServiceStub(channel), secret_service)


@pytest.fixture
async def on_jwks(jwks_service: ServiceProcess) -> AsyncIterator[Caller]:
    async with grpc.aio.insecure_channel(jwks_service.address) as channel:
        yield Caller(task_pb2_grpc.TaskServiceStub(channel), jwks_service)


def new_user_id() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def assert_unauthenticated(error: grpc.aio.AioRpcError, detail: str = "") -> None:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert detail.lower() in error.details().lower(), error.details()
    trailers = dict(error.trailing_metadata() or ())
    assert str(trailers.get("www-authenticate", "")).startswith("Bearer"), trailers


# --- shared-secret mode ----------------------------------------------------------------


async def test_secret_mode_accepts_a_valid_token(on_secret: Caller) -> None:
    user_id = new_user_id()
    assert (await on_secret.create(bearer(token(user_id)), "mine")).id == 1
    assert [task.title for task in (await on_secret.list(bearer(token(user_id)))).tasks] == ["mine"]
    assert (await on_secret.list(f"bearer  {token(user_id)} ")).tasks  # scheme is case-insensitive


async def test_missing_token_is_unauthenticated(on_secret: Caller) -> None:
    assert_unauthenticated(await on_secret.refused(None), "missing bearer token")
    assert_unauthenticated(await on_secret.refused(""), "missing bearer token")


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNzd29yZA==", "Bearer", "Bearer    ", "TOKEN", "Bearer not-a-jwt", "Bearer a.b.c", "Token x.y.z"],
)
async def test_malformed_authorization_is_unauthenticated(on_secret: Caller, authorization: str) -> None:
    assert_unauthenticated(await on_secret.refused(authorization))


async def test_token_without_the_bearer_scheme_is_unauthenticated(on_secret: Caller) -> None:
    assert_unauthenticated(await on_secret.refused(token(new_user_id())))


async def test_bad_signature_is_unauthenticated(on_secret: Caller) -> None:
    user_id = new_user_id()
    assert_unauthenticated(await on_secret.refused(bearer(token(user_id, secret="another-secret-" + "y" * 32))))
    good = token(user_id)
    head, payload, signature = good.split(".")
    forged_payload = _b64(json.dumps(claims_for("someone-else")).encode())
    assert_unauthenticated(await on_secret.refused(bearer(f"{head}.{forged_payload}.{signature}")))
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert_unauthenticated(await on_secret.refused(bearer(f"{head}.{payload}.{flipped}")))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_unauthenticated(on_secret: Caller, alg: str) -> None:
    unsigned = handmade_token({"alg": alg, "typ": "JWT"}, claims_for(new_user_id()), sign=None)
    assert_unauthenticated(await on_secret.refused(bearer(unsigned)))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS512 with our 44-byte secret
async def test_other_algorithms_are_refused_in_secret_mode(on_secret: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    user_id = new_user_id()
    hs512 = jwt.encode(claims_for(user_id), SECRET, algorithm="HS512")  # the right secret, not HS256
    assert_unauthenticated(await on_secret.refused(bearer(hs512)), INVALID_TOKEN)
    assert "alg" in on_secret.reason()
    for key in jwks_keys.values():
        assert_unauthenticated(await on_secret.refused(bearer(key.sign(claims_for(user_id)))))


async def test_expired_beyond_the_leeway_is_unauthenticated(on_secret: Caller) -> None:
    user_id = new_user_id()
    expired = jwt.encode(claims_for(user_id, ttl_seconds=-(LEEWAY_SECONDS + 60)), SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(expired)), "expired")
    # Within the leeway a just-expired token still works (clock skew between machines).
    just_expired = jwt.encode(claims_for(user_id, ttl_seconds=-5), SECRET, algorithm="HS256")
    assert (await on_secret.list(bearer(just_expired))).tasks == []


async def test_not_yet_valid_is_unauthenticated(on_secret: Caller) -> None:
    future = int(time.time()) + LEEWAY_SECONDS + 300
    early = jwt.encode(claims_for(new_user_id(), nbf=future), SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(early)))


@pytest.mark.parametrize(
    "changes",
    [{"exp": None}, {"sub": None}, {"sub": ""}, {"sub": 42}, {"sub": "x" * 256}, {"sub": "a\x00b"}, {"exp": "soon"}],
    ids=["no-exp", "no-sub", "empty-sub", "numeric-sub", "long-sub", "nul-sub", "string-exp"],
)
async def test_bad_claims_are_unauthenticated(on_secret: Caller, changes: dict[str, Any]) -> None:
    bad = jwt.encode(claims_for(new_user_id(), **changes), SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(bad)))


async def test_refused_calls_write_nothing(on_secret: Caller) -> None:
    user_id = new_user_id()
    for bad in (
        bearer(token(user_id, secret="wrong-secret-" + "z" * 32)),
        bearer(handmade_token({"alg": "none"}, claims_for(user_id), sign=None)),
        bearer(jwt.encode(claims_for(user_id, ttl_seconds=-3600), SECRET, algorithm="HS256")),
    ):
        with pytest.raises(grpc.aio.AioRpcError):
            await on_secret.create(bad, "should not exist")
    assert (await on_secret.list(bearer(token(user_id)))).tasks == []
    assert (await on_secret.create(bearer(token(user_id)))).id == 1


async def test_oversized_token_is_unauthenticated(on_secret: Caller) -> None:
    huge = jwt.encode(claims_for(new_user_id(), padding="p" * 9000), SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(huge)))


async def test_request_user_id_other_than_the_caller_is_permission_denied(on_secret: Caller) -> None:
    alice, bob = new_user_id(), new_user_id()
    stub, metadata = on_secret.stub, (("authorization", bearer(token(alice))),)
    await stub.CreateTask(task_pb2.CreateTaskRequest(title="alice 1"), metadata=metadata, timeout=TIMEOUT)
    bob_md = (("authorization", bearer(token(bob))),)
    await stub.CreateTask(task_pb2.CreateTaskRequest(title="bob 1"), metadata=bob_md, timeout=TIMEOUT)

    # Alice's token, Bob's user id in the request: refused, whatever the RPC.
    calls = {
        "CreateTask": task_pb2.CreateTaskRequest(user_id=bob, title="x"),
        "GetTask": task_pb2.GetTaskRequest(user_id=bob, task_id=1),
        "ListTasks": task_pb2.ListTasksRequest(user_id=bob),
        "UpdateTask": task_pb2.UpdateTaskRequest(user_id=bob, task_id=1, title="x"),
        "SetTaskCompleted": task_pb2.SetTaskCompletedRequest(user_id=bob, task_id=1),
        "DeleteTask": task_pb2.DeleteTaskRequest(user_id=bob, task_id=1),
    }
    for method, request in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request, metadata=metadata, timeout=TIMEOUT)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, caught.value)
        assert "user_id" in caught.value.details()

    bob_tasks = await stub.ListTasks(task_pb2.ListTasksRequest(user_id=bob), metadata=bob_md, timeout=TIMEOUT)
    assert [(task.id, task.title, task.completed) for task in bob_tasks.tasks] == [(1, "bob 1", False)]
    # The caller's own id in the request (the REST path's {user_id}) is fine.
    own = await stub.ListTasks(task_pb2.ListTasksRequest(user_id=alice), metadata=metadata, timeout=TIMEOUT)
    assert [task.title for task in own.tasks] == ["alice 1"]


# --- JWKS mode -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "RS256", "ES256"])
async def test_jwks_mode_accepts_each_algorithm(
    on_jwks: Caller, jwks_keys: dict[str, SigningKey], jwks_server: JwksServer, alg: str
) -> None:
    user_id = new_user_id()
    signed = bearer(jwks_keys[alg].sign(claims_for(user_id, iss=ISSUER, aud=AUDIENCE)))
    assert (await on_jwks.create(signed, f"via {alg}")).id == 1
    assert jwks_server.requests >= 1  # the keys really came over HTTP
    assert [task.title for task in (await on_jwks.list(signed)).tasks] == [f"via {alg}"]


async def test_jwks_mode_accepts_an_audience_list_that_contains_ours(
    on_jwks: Caller, jwks_keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(new_user_id(), iss=ISSUER, aud=["http://other.test", AUDIENCE])
    assert (await on_jwks.list(bearer(jwks_keys["EdDSA"].sign(claims)))).tasks == []


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"iss": "http://evil.test"}, "issuer"),
        ({"iss": None}, "iss"),
        ({"aud": "http://other-app.test"}, "audience"),
        ({"aud": None}, "aud"),
        ({"exp": None}, "exp"),
    ],
    ids=["wrong-iss", "no-iss", "wrong-aud", "no-aud", "no-exp"],
)
async def test_jwks_mode_enforces_issuer_audience_and_exp(
    on_jwks: Caller, jwks_keys: dict[str, SigningKey], changes: dict[str, Any], detail: str
) -> None:
    claims = claims_for(new_user_id(), **{"iss": ISSUER, "aud": AUDIENCE, **changes})
    for key in jwks_keys.values():
        assert_unauthenticated(await on_jwks.refused(bearer(key.sign(claims))), INVALID_TOKEN)
        assert detail in on_jwks.reason().lower()


async def test_jwks_mode_refuses_expired_tokens(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    claims = claims_for(new_user_id(), ttl_seconds=-(LEEWAY_SECONDS + 60), iss=ISSUER, aud=AUDIENCE)
    assert_unauthenticated(await on_jwks.refused(bearer(jwks_keys["EdDSA"].sign(claims))), "expired")


async def test_jwks_mode_refuses_hs256_key_confusion(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    claims = claims_for(new_user_id(), iss=ISSUER, aud=AUDIENCE)
    rsa_key = jwks_keys["RS256"]
    # The classic attack: HMAC-sign with the (public) RSA key's PEM, naming that key.
    for pem in (rsa_key.public_pem(), rsa_key.public_pem().strip()):

        def hmac_with_pem(data: bytes, pem: bytes = pem) -> bytes:
            return hmac.new(pem, data, hashlib.sha256).digest()

        confused = handmade_token({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims, sign=hmac_with_pem)
        assert_unauthenticated(await on_jwks.refused(bearer(confused)), INVALID_TOKEN)
        assert "alg" in on_jwks.reason()
    # And the shared secret, still in the environment, means nothing in JWKS mode.
    with_secret = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": rsa_key.kid})
    assert_unauthenticated(await on_jwks.refused(bearer(with_secret)), INVALID_TOKEN)
    assert "alg" in on_jwks.reason()


async def test_jwks_mode_refuses_alg_none(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    claims = claims_for(new_user_id(), iss=ISSUER, aud=AUDIENCE)
    unsigned = handmade_token({"alg": "none", "kid": jwks_keys["EdDSA"].kid}, claims, sign=None)
    assert_unauthenticated(await on_jwks.refused(bearer(unsigned)))


async def test_jwks_mode_refuses_unknown_or_missing_kid(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    claims = claims_for(new_user_id(), iss=ISSUER, aud=AUDIENCE)
    assert_unauthenticated(await on_jwks.refused(bearer(jwks_keys["EdDSA"].sign(claims, kid="no-such-key"))))
    no_kid = jwt.encode(claims, jwks_keys["EdDSA"].private, algorithm="EdDSA")
    assert_unauthenticated(await on_jwks.refused(bearer(no_kid)), INVALID_TOKEN)
    assert "kid" in on_jwks.reason()


async def test_jwks_mode_refuses_a_signature_by_another_key(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    claims = claims_for(new_user_id(), iss=ISSUER, aud=AUDIENCE)
    strangers = new_keys("stranger")
    for alg, key in jwks_keys.items():
        # A key of the same type, not in the JWKS, claiming a published key's id.
        assert_unauthenticated(await on_jwks.refused(bearer(strangers[alg].sign(claims, kid=key.kid))))
    # An EC-signed token naming the RSA key's id: the algorithm does not fit the key.
    mismatched = strangers["ES256"].sign(claims, kid=jwks_keys["RS256"].kid)
    assert_unauthenticated(await on_jwks.refused(bearer(mismatched)))


async def test_jwks_mode_wrong_user_is_permission_denied(on_jwks: Caller, jwks_keys: dict[str, SigningKey]) -> None:
    signed = bearer(jwks_keys["ES256"].sign(claims_for(new_user_id(), iss=ISSUER, aud=AUDIENCE)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await on_jwks.list(signed, user_id=new_user_id())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- JWKS mode: key rotation and outages (one backend: this is about keys, not storage) ---


@pytest.fixture(scope="module")
def rotating() -> Iterator[tuple[JwksServer, dict[str, SigningKey]]]:
    keys = new_keys("rotating")
    server = JwksServer(list(keys.values()))
    yield server, keys
    server.close()


@pytest.fixture(scope="module")
def rotating_service(
    rotating: tuple[JwksServer, dict[str, SigningKey]],
    database_url_factory: Callable[[str, str], str],
    base_env: dict[str, str],
    log_dir: Any,
) -> Iterator[ServiceProcess]:
    # No AUTH_ISSUER/AUTH_AUDIENCE: tokens carrying any iss/aud are fine. Keys cached 1 s.
    env = {**base_env, "AUTH_JWKS_URL": rotating[0].url, "AUTH_JWKS_CACHE_SECONDS": "1"}
    yield from _start("sqlite", env, database_url_factory, log_dir)


@pytest.fixture
async def on_rotating(rotating_service: ServiceProcess) -> AsyncIterator[Caller]:
    async with grpc.aio.insecure_channel(rotating_service.address) as channel:
        yield Caller(task_pb2_grpc.TaskServiceStub(channel), rotating_service)


async def test_without_configured_issuer_or_audience_any_are_accepted(
    on_rotating: Caller, rotating: tuple[JwksServer, dict[str, SigningKey]]
) -> None:
    _, keys = rotating
    claims = claims_for(new_user_id(), iss="https://better-auth.example", aud="https://better-auth.example")
    assert (await on_rotating.list(bearer(keys["EdDSA"].sign(claims)))).tasks == []


async def test_a_key_removed_from_the_jwks_stops_working_after_the_cache_time(
    on_rotating: Caller, rotating: tuple[JwksServer, dict[str, SigningKey]]
) -> None:
    server, keys = rotating
    signed = bearer(keys["RS256"].sign(claims_for(new_user_id())))
    assert (await on_rotating.list(signed)).tasks == []
    server.keys = [key for key in server.keys if key.alg != "RS256"]  # revoked
    await asyncio.sleep(2.5)  # AUTH_JWKS_CACHE_SECONDS=1 on the service
    assert_unauthenticated(await on_rotating.refused(signed))
    assert (await on_rotating.list(bearer(keys["EdDSA"].sign(claims_for(new_user_id()))))).tasks == []


async def test_an_unreachable_jwks_is_unavailable_not_unauthenticated(
    on_rotating: Caller, rotating: tuple[JwksServer, dict[str, SigningKey]]
) -> None:
    server, keys = rotating
    signed = bearer(keys["ES256"].sign(claims_for(new_user_id())))
    server.failing = True
    try:
        await asyncio.sleep(2.5)  # past the key cache: the service has to ask the endpoint
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await on_rotating.list(signed)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    finally:
        server.failing = False
    assert (await on_rotating.list(signed)).tasks == []


# --- the verified-token cache ------------------------------------------------------------


async def test_a_remembered_token_still_expires_on_time() -> None:
    """The verifier remembers verified tokens, but never past their own `exp`."""
    from common.auth import TokenVerifier
    from common.errors import Unauthenticated
    from common.settings import Settings

    verifier = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": SECRET, "AUTH_LEEWAY_SECONDS": "0"}))
    short_lived = token("cache-user", ttl_seconds=1)
    assert await verifier.verify(short_lived) == "cache-user"
    assert await verifier.verify(short_lived) == "cache-user"  # remembered
    await asyncio.sleep(2.1)
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(short_lived)


async def test_a_remembered_token_does_not_vouch_for_a_tampered_copy() -> None:
    from common.auth import TokenVerifier
    from common.errors import Unauthenticated
    from common.settings import Settings

    verifier = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": SECRET}))
    genuine = token("cache-user")
    assert await verifier.verify(genuine) == "cache-user"
    header, payload, signature = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged_payload = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "victim"}).encode()).decode().rstrip("=")
    with pytest.raises(Unauthenticated):
        await verifier.verify(f"{header}.{forged_payload}.{signature}")


# --- what a refusal tells the client, and what the audit log keeps ------------------------

PYJWT_PHRASES = ("Signature verification failed", "Not enough segments", "alg value is not allowed", "padding")


async def test_pyjwt_messages_never_reach_the_client_and_the_reason_is_audited(on_secret: Caller) -> None:
    user_id = new_user_id()
    forged = token(user_id, secret="another-secret-" + "y" * 32)
    cases = {
        forged: "Signature verification failed",
        "a.b": "Not enough segments",
        "a.b.c": "Invalid header padding",
        handmade_token({"alg": "none"}, claims_for(user_id), sign=None): "alg value is not allowed",
        jwt.encode(claims_for(user_id, ttl_seconds=-3600), SECRET, algorithm="HS256"): "Signature has expired",
    }
    for bad, reason in cases.items():
        refused = await on_secret.refused(bearer(bad))
        assert_unauthenticated(refused)
        assert refused.details() == INVALID_TOKEN, refused.details()
        record = on_secret.audit()
        assert record["event"] == "auth_refused" and record["surface"] == "grpc", record
        assert record["method"] == "/todo.v1.TaskService/CreateTask", record
        assert reason in record["reason"], record
        assert bad not in json.dumps(record), "the audit record holds the token"
    log_text = on_secret.service.log_path.read_text()
    assert forged not in log_text and forged.split(".")[2] not in log_text, "a token reached the log"


async def test_a_path_user_other_than_the_caller_is_audited_as_permission_denied(on_secret: Caller) -> None:
    alice, bob = new_user_id(), new_user_id()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await on_secret.list(bearer(token(alice)), user_id=bob)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    record = on_secret.audit()
    assert record["event"] == "permission_denied", record
    assert record["user"] == alice and bob in record["reason"], record
    assert record["method"] == "/todo.v1.TaskService/ListTasks", record


async def test_more_than_one_authorization_value_is_refused(on_secret: Caller) -> None:
    alice, bob = new_user_id(), new_user_id()
    await on_secret.create(bearer(token(alice)), "alice's")
    twice = (("authorization", bearer(token(bob))), ("authorization", bearer(token(alice))))
    stub = on_secret.stub
    for method, request in (
        (stub.ListTasks, task_pb2.ListTasksRequest()),
        (stub.CreateTask, task_pb2.CreateTaskRequest(title="planted")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request, metadata=twice, timeout=TIMEOUT)
        assert_unauthenticated(caught.value, "send one authorization header")
    # What HTTP makes of two headers: one value, joined by a comma (Envoy forwards it so).
    joined = f"{bearer(token(bob))}, {bearer(token(alice))}"
    assert_unauthenticated(await on_secret.refused(joined), "send one authorization header")
    assert [task.title for task in (await on_secret.list(bearer(token(alice)))).tasks] == ["alice's"]
    assert (await on_secret.list(bearer(token(bob)))).tasks == []


DAY = 86400  # the AUTH_MAX_TOKEN_LIFETIME_SECONDS default


async def test_tokens_living_longer_than_the_maximum_are_refused(on_secret: Caller) -> None:
    user_id = new_user_id()
    now = int(time.time())
    too_long = jwt.encode({"sub": user_id, "iat": now, "exp": now + DAY + 60}, SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(too_long)), INVALID_TOKEN)
    assert "lifetime" in on_secret.reason()
    # Without `iat` the lifetime counts from now.
    far_exp = jwt.encode({"sub": user_id, "exp": now + 2 * DAY}, SECRET, algorithm="HS256")
    assert_unauthenticated(await on_secret.refused(bearer(far_exp)), INVALID_TOKEN)
    assert "lifetime" in on_secret.reason()
    # An old but still valid day-long token is fine: the lifetime is exp - iat, not exp - now.
    day_long = jwt.encode({"sub": user_id, "iat": now - 3600, "exp": now - 3600 + DAY}, SECRET, algorithm="HS256")
    assert (await on_secret.list(bearer(day_long))).tasks == []
    short_no_iat = jwt.encode({"sub": user_id, "exp": now + 3600}, SECRET, algorithm="HS256")
    assert (await on_secret.list(bearer(short_no_iat))).tasks == []


async def test_the_maximum_lifetime_is_a_setting_and_make_token_stays_within_the_default() -> None:
    from common.auth import TokenVerifier
    from common.errors import Unauthenticated
    from common.settings import Settings

    default = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": SECRET}))
    make_token = await asyncio.create_subprocess_exec(  # what `make token` runs
        sys.executable,
        "-m",
        "common.tokens",
        "maker",
        cwd=ROOT,
        env={**os.environ, "BETTER_AUTH_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
    )
    made, _ = await make_token.communicate()
    assert make_token.returncode == 0
    assert await default.verify(made.decode().strip()) == "maker"
    assert await default.verify(token("helper")) == "helper"  # tests' token(): 3600 s
    strict = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": SECRET, "AUTH_MAX_TOKEN_LIFETIME_SECONDS": "600"}))
    with pytest.raises(Unauthenticated) as refused:
        await strict.verify(token("helper", ttl_seconds=3600))
    assert refused.value.message == INVALID_TOKEN and "lifetime" in refused.value.reason
    unlimited = TokenVerifier(Settings.load({"BETTER_AUTH_SECRET": SECRET, "AUTH_MAX_TOKEN_LIFETIME_SECONDS": "0"}))
    assert await unlimited.verify(token("desktop", ttl_seconds=30 * DAY)) == "desktop"
