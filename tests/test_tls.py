"""The gateway over TLS: GATEWAY_TLS_CERT and GATEWAY_TLS_KEY make Envoy serve HTTPS only.

A self-signed certificate for 127.0.0.1 is made here (the `cryptography` package); real Envoy
serves it in front of task_service. Proven: REST over HTTP/1.1 with the certificate verified
(urllib + ssl), ALPN offering h2 and http/1.1 and picking each, a native gRPC call (HTTP/2) over
the same TLS port, plain HTTP on that port not served, and half a TLS configuration refused.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.settings import Settings
from gateway import envoy_config
from scripts.stack import Stack
from tests.gateway_fixtures import gateway_env
from tests.support import auth_metadata, token
from todo.v1 import task_pb2, task_pb2_grpc


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for the IP address `host` and its key, as PEM files in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def stack(
    certificate: tuple[Path, Path], database_url_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work_dir = tmp_path_factory.mktemp("gateway-tls")
    (work_dir / "state").mkdir()
    env = gateway_env({"task": database_url_factory("sqlite", "tls_tasks")}, work_dir / "state")
    env |= {"GATEWAY_TLS_CERT": str(certificate[0]), "GATEWAY_TLS_KEY": str(certificate[1])}
    started = Stack(env, work_dir=work_dir, services=["task"]).start(timeout=120)
    try:
        yield started
    finally:
        started.stop()


def trusting(certificate: tuple[Path, Path], alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that trusts only our certificate, checking the host name (127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def https(stack: Stack, certificate: tuple[Path, Path], method: str, path: str, user: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"{stack.base_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30, context=trusting(certificate)) as response:
        assert response.status == 200
        return json.loads(response.read())


def port_of(stack: Stack) -> int:
    return stack.settings.gateway_port


def test_rest_over_https_with_the_certificate_verified(stack: Stack, certificate: tuple[Path, Path]) -> None:
    assert stack.base_url.startswith("https://127.0.0.1:")
    user = f"tls-{uuid.uuid4().hex[:8]}"
    created = https(stack, certificate, "POST", f"/api/{user}/tasks", user, {"title": "Renew the certificate"})
    assert created["id"] == 1 and created["title"] == "Renew the certificate"
    listed = https(stack, certificate, "GET", f"/api/{user}/tasks", user)
    assert [task["title"] for task in listed["tasks"]] == ["Renew the certificate"]
    with urllib.request.urlopen(f"{stack.base_url}/readyz", timeout=10, context=trusting(certificate)) as response:
        assert response.status == 200


def test_a_client_that_does_not_trust_the_certificate_is_refused(stack: Stack) -> None:
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"{stack.base_url}/healthz", timeout=10, context=ssl.create_default_context())
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


@pytest.mark.parametrize(("offered", "selected"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")])
def test_alpn_negotiates_http2_and_http1(
    stack: Stack, certificate: tuple[Path, Path], offered: list[str], selected: str
) -> None:
    context = trusting(certificate, offered)
    with (
        socket.create_connection(("127.0.0.1", port_of(stack)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.selected_alpn_protocol() == selected
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        if selected == "http/1.1":  # and it speaks HTTP/1.1 on it
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200")


def test_grpc_over_tls_uses_http2_through_the_gateway(stack: Stack, certificate: tuple[Path, Path]) -> None:
    """A native gRPC client (HTTP/2 only, ALPN h2) on the same HTTPS port."""
    user = f"tls-grpc-{uuid.uuid4().hex[:8]}"
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0].read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port_of(stack)}", credentials) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        created = stub.CreateTask(
            task_pb2.CreateTaskRequest(user_id=user, title="Over h2"), metadata=auth_metadata(user), timeout=30
        )
        listed = stub.ListTasks(task_pb2.ListTasksRequest(user_id=user), metadata=auth_metadata(user), timeout=30)
    assert created.title == "Over h2"
    assert [task.title for task in listed.tasks] == ["Over h2"]


def test_plain_http_is_not_served_on_the_tls_port(stack: Stack) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port_of(stack), timeout=10)
    try:
        with pytest.raises((OSError, http.client.HTTPException)):
            connection.request("GET", "/healthz")
            connection.getresponse()
    finally:
        connection.close()


def test_half_a_tls_configuration_is_refused() -> None:
    for only in ({"GATEWAY_TLS_CERT": "/x/cert.pem"}, {"GATEWAY_TLS_KEY": "/x/key.pem"}):
        with pytest.raises(SystemExit, match="GATEWAY_TLS_CERT and GATEWAY_TLS_KEY"):
            envoy_config.render(Settings.load(only))


def test_the_rendered_listener_offers_h2_and_http1(certificate: tuple[Path, Path]) -> None:
    settings = Settings.load({"GATEWAY_TLS_CERT": str(certificate[0]), "GATEWAY_TLS_KEY": str(certificate[1])})
    [chain] = envoy_config.render(settings, "docker")["static_resources"]["listeners"][0]["filter_chains"]
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    assert context["tls_certificates"] == [
        {"certificate_chain": {"filename": str(certificate[0])}, "private_key": {"filename": str(certificate[1])}}
    ]
    plain = envoy_config.render(Settings.load({}), "docker")["static_resources"]["listeners"][0]["filter_chains"]
    assert "transport_socket" not in plain[0]
