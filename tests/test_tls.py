"""TLS endpoints: certificates made by openssl, served by StreamServer and by `tend`,
fetched by Python's ssl client verifying against that certificate."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import POEM, run_once

from tend.endpoints import (
    EndpointSyntaxError,
    ListenError,
    TLSEndpoint,
    parse_endpoint,
    tls_context,
)
from tend.errors import quote
from tend.net import StreamServer

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
FOREGROUND = ["--nodaemon", "--pidfile", ""]


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


def make_certificate(folder: Path, name: str) -> Certificate:
    """A self-signed certificate for localhost and 127.0.0.1, and its unencrypted key."""
    assert OPENSSL is not None
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Certificate(cert, key)


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    if OPENSSL is None:
        pytest.skip("needs the openssl command")
    return make_certificate(tmp_path, "server")


@pytest.fixture
def other_certificate(tmp_path: Path) -> Certificate:
    if OPENSSL is None:
        pytest.skip("needs the openssl command")
    return make_certificate(tmp_path, "other")


def client_context(certificate: Certificate) -> ssl.SSLContext:
    """A client that trusts only *certificate*, and checks the host name against it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certificate.cert))
    return context


def fetch_tls(port: int, context: ssl.SSLContext) -> tuple[bytes, str | None]:
    """Read to end-of-file over TLS from 127.0.0.1:*port*; return the data and TLS version."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), sock.version()


def describe(certificate: Certificate, port: int = 0, *, key: Path | None = None) -> str:
    return (
        f"tls:{port}:interface=127.0.0.1:certKey={certificate.cert}"
        f":privateKey={key or certificate.key}"
    )


# Parsing


def test_parses_a_tls_endpoint_with_absolute_paths(tmp_path: Path) -> None:
    """Relative certKey and privateKey are made absolute (tend changes directory later)."""
    os.chdir(tmp_path)
    endpoint = parse_endpoint("tls:8443:certKey=cert.pem:privateKey=keys/key.pem", "localhost")
    assert endpoint == TLSEndpoint(
        8443, str(tmp_path / "cert.pem"), str(tmp_path / "keys" / "key.pem"), "localhost"
    )
    assert str(endpoint) == "localhost:8443"


@pytest.mark.parametrize("kind", ["tls", "ssl", "TLS"])
def test_one_file_may_hold_both_certificate_and_key(kind: str) -> None:
    """Either key alone names a file holding both (ssl: is twistd's name for tls:)."""
    both = TLSEndpoint(443, "/etc/tend/both.pem", "/etc/tend/both.pem", "127.0.0.1", 50, True)
    assert (
        parse_endpoint(
            f"{kind}:443:certKey=/etc/tend/both.pem:backlog=50:reusePort=yes", "127.0.0.1"
        )
        == both
    )
    assert (
        parse_endpoint(f"{kind}:port=443:privateKey=/etc/tend/both.pem:interface=127.0.0.1:"
                       "backlog=50:reusePort=yes")
        == both
    )  # fmt: skip


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("tls:8443", "no certificate given; expected tls:PORT:certKey=CERT.pem"),
        ("tls:8443:certKey=", "no certificate given"),
        ("tls:certKey=c.pem", "no port given"),
        ("tls:99999:certKey=c.pem", "port must be a number from 0 to 65535"),
        ("tls:8443:8444:certKey=c.pem", "too many fields"),
        ("tls:8443:certKey=c.pem:sslmethod=TLSv1", "unknown option 'sslmethod'"),
    ],
)
def test_rejects_a_bad_tls_description(description: str, reason: str) -> None:
    """A bad TLS description is a syntax error quoting it and saying why."""
    with pytest.raises(EndpointSyntaxError) as caught:
        parse_endpoint(description)
    # A long description is quoted shortened in the middle.
    assert str(caught.value).startswith("invalid endpoint '")
    assert f"': {reason}" in str(caught.value)


# Loading certificates


@needs_openssl
def test_context_allows_tls_1_2_and_later_only(certificate: Certificate) -> None:
    """The server context is TLS_SERVER, at least TLS 1.2, with the certificate loaded."""
    context = tls_context(parse_endpoint(describe(certificate)))  # type: ignore[arg-type]
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def tls_error(endpoint: str) -> str:
    parsed = parse_endpoint(endpoint)
    assert isinstance(parsed, TLSEndpoint)
    with pytest.raises(ListenError) as caught:
        tls_context(parsed)
    return str(caught.value)


@needs_openssl
def test_unreadable_files_are_named_with_the_reason(
    certificate: Certificate, tmp_path: Path
) -> None:
    """A missing certificate or key: `cannot read TLS certificate 'PATH': REASON`."""
    missing = tmp_path / "missing.pem"
    assert tls_error(f"tls:0:certKey={missing}:privateKey={certificate.key}") == (
        f"cannot read TLS certificate '{missing}': No such file or directory"
    )
    assert tls_error(f"tls:0:certKey={certificate.cert}:privateKey={missing}") == (
        f"cannot read TLS private key '{missing}': No such file or directory"
    )
    assert tls_error(f"tls:0:certKey={tmp_path}:privateKey={certificate.key}") == (
        f"cannot read TLS certificate '{tmp_path}': it is a directory, not a regular file"
    )


@needs_openssl
def test_a_key_that_does_not_match_is_named(
    certificate: Certificate, other_certificate: Certificate
) -> None:
    """Another certificate's key: the message names the key and the certificate."""
    message = tls_error(describe(certificate, key=other_certificate.key))
    assert message == (
        f"cannot use TLS private key {quote(str(other_certificate.key), 70)}: it does not "
        f"match the certificate in '{certificate.cert.name}'"
    )


@needs_openssl
def test_files_without_pem_contents_are_named(certificate: Certificate, tmp_path: Path) -> None:
    """A file holding no certificate, or no key, is named as the one at fault."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert tls_error(f"tls:0:certKey={junk}:privateKey={certificate.key}") == (
        f"cannot use TLS certificate '{junk}': it holds no PEM certificate"
    )
    assert tls_error(f"tls:0:certKey={certificate.cert}:privateKey={junk}") == (
        f"cannot use TLS private key '{junk}': it holds no PEM private key"
    )
    assert tls_error(f"tls:0:certKey={certificate.cert}") == (
        f"cannot use TLS certificate '{certificate.cert}': it holds no PEM private key; "
        "give the key's file as privateKey=PATH"
    )


@needs_openssl
def test_a_combined_file_is_enough(certificate: Certificate, tmp_path: Path) -> None:
    """A file with the certificate and the key in it serves as both."""
    both = tmp_path / "both.pem"
    both.write_bytes(certificate.cert.read_bytes() + certificate.key.read_bytes())
    parsed = parse_endpoint(f"tls:0:certKey={both}")
    assert isinstance(parsed, TLSEndpoint)
    tls_context(parsed)


@needs_openssl
def test_an_encrypted_key_is_refused_without_prompting(
    certificate: Certificate, tmp_path: Path
) -> None:
    """A passphrase-protected key is an error, never a prompt on the terminal."""
    assert OPENSSL is not None
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run(
        [OPENSSL, "pkey", "-in", str(certificate.key), "-aes256", "-passout", "pass:secret",
         "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    assert tls_error(describe(certificate, key=encrypted)) == (
        f"cannot use TLS private key '{encrypted}': it is encrypted; tend needs it "
        "unencrypted (openssl pkey -in KEY -out NEW_KEY)"
    )


# Serving, in process


class Greeter(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello\n")
        transport.close()


@pytest.fixture
async def tls_server(certificate: Certificate) -> Iterator[StreamServer]:
    server = StreamServer(describe(certificate), Greeter)
    server.privileged_start_service()
    await server.start_service()
    yield server  # type: ignore[misc]
    await server.stop_service()


@needs_openssl
async def test_stream_server_serves_tls(tls_server: StreamServer, certificate: Certificate) -> None:
    """A TLS StreamServer completes a verified handshake (TLS 1.2 or 1.3) and serves."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls_server.port, ssl=client_context(certificate), server_hostname="localhost"
    )
    try:
        assert await reader.read() == b"hello\n"
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    finally:
        writer.close()
        await writer.wait_closed()


def tls_1_1_only(context: ssl.SSLContext) -> ssl.SSLContext:
    """Make *context* speak TLS 1.1 and nothing else (this OpenSSL refuses it by default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is, as it should be
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version a fetch from *port* agreed on, or the reason the handshake failed."""
    try:
        _, version = fetch_tls(port, context)
    except ssl.SSLError as error:
        return f"failed: {error.reason}"
    except ConnectionError as error:
        return f"failed: {error}"
    return str(version)


@needs_openssl
async def test_a_tls_1_1_client_is_turned_away(
    tls_server: StreamServer, certificate: Certificate
) -> None:
    """A client that speaks only TLS 1.1, which a TLS 1.1 server serves, fails with tend."""
    client = tls_1_1_only(client_context(certificate))
    permissive = tls_1_1_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    permissive.load_cert_chain(certificate.cert, certificate.key)
    control = await asyncio.start_server(
        lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=permissive
    )
    try:
        control_port = control.sockets[0].getsockname()[1]
        agreed = await asyncio.to_thread(handshake, control_port, client)
    finally:
        control.close()
        await control.wait_closed()
    if agreed != "TLSv1.1":
        pytest.skip(f"this OpenSSL cannot speak TLS 1.1 even when asked to ({agreed})")
    port = tls_server.port
    assert port is not None

    assert (await asyncio.to_thread(handshake, port, client)).startswith("failed: ")


@needs_openssl
async def test_a_plain_tcp_client_gets_no_poem_in_clear(
    tls_server: StreamServer,
) -> None:
    """Bytes that are not a TLS handshake get no greeting in clear text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        data = await reader.read()
        assert b"hello" not in data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


# Serving, with `tend`


@needs_openssl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tend_serves_the_poem_over_tls(run_tend, certificate, loop):
    """`tend poetry --port tls:...` serves the poem to a client verifying the certificate."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    tend = run_tend(*FOREGROUND, "--loop", loop, "poetry", "--port", describe(certificate))
    port = tend.wait_for_port()
    poem, version = fetch_tls(port, client_context(certificate))
    assert poem == POEM.read_bytes()
    assert version in ("TLSv1.2", "TLSv1.3")
    assert tend.stop() == 0


@needs_openssl
def test_tend_with_a_missing_certificate_says_so_in_one_line(
    certificate: Certificate, tmp_path: Path
) -> None:
    """A certificate path that does not exist: one line on stderr, exit 1."""
    endpoint = f"tls:0:interface=127.0.0.1:certKey=missing.pem:privateKey={certificate.key}"
    result = run_once(*FOREGROUND, "poetry", "--port", endpoint, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"tend: cannot read TLS certificate '{tmp_path / 'missing.pem'}': No such file or directory"
    ]


@needs_openssl
def test_tend_with_a_mismatched_key_says_so_in_one_line(
    certificate: Certificate, other_certificate: Certificate, tmp_path: Path
) -> None:
    """Another certificate's key: one line on stderr, exit 1, nothing left listening."""
    endpoint = describe(certificate, key=other_certificate.key)
    result = run_once(*FOREGROUND, "poetry", "--port", endpoint, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"tend: cannot use TLS private key {quote(str(other_certificate.key), 70)}: it does "
        f"not match the certificate in '{certificate.cert.name}'"
    ]


@needs_openssl
@needs_root
def test_a_root_only_key_serves_after_dropping_to_nobody(run_tend, certificate, tmp_path):
    """The key is read as root before the drop: `-u nobody` serves with a 0600 root key."""
    os.chown(certificate.key, 0, 0)
    certificate.key.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    tend = run_tend(*FOREGROUND, "-u", "nobody", "poetry", "--port", describe(certificate))
    port = tend.wait_for_port()
    poem, _ = fetch_tls(port, client_context(certificate))
    assert poem == POEM.read_bytes()
    workers = Path(f"/proc/{tend.pid}/task/{tend.pid}/children").read_text().split()
    assert workers, "tend -u nobody serves from a worker process"
    for worker in workers:
        status = Path(f"/proc/{worker}/status").read_text()
        assert f"Uid:\t{nobody.pw_uid}\t" in status
    assert tend.stop() == 0
