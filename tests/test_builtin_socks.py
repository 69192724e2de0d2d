"""tend socks, run for real, with real clients: curl, ncat and netcat-openbsd's nc.

The destinations are peers in the test process (see test_builtin_relay): an HTTP server
for curl, and a server that answers only after the client's end-of-file, which proves the
half-close went through the proxy (twistd's socks drops it, and hangs on a SOCKS5 greeting,
and relays anywhere). Each refusal is checked with the reply code its version sends, and
with the peer never reached.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import TEND, Spawned, Tend, assert_usage_error, run_once, wait_until
from test_builtin_relay import (
    HTTP_BODY,
    PeerServer,
    answer_after_eof,
    answer_http,
    expected_answer,
)

from tend.builtins.socks import Policy, normalised, parse_host_rule, parse_network_rule

FOREGROUND = ("--nodaemon", "--pidfile", "")
LOCAL = ("--listen", "tcp:0:interface=127.0.0.1")


def needs(program: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(program) is None,
        reason=f"needs {program} (make test installs it, as root)",
    )


@pytest.fixture
def http_peer() -> Iterator[PeerServer]:
    with PeerServer(answer_http) as peer:
        yield peer


@pytest.fixture
def eof_peer() -> Iterator[PeerServer]:
    with PeerServer(answer_after_eof) as peer:
        yield peer


StartSocks = Callable[..., tuple[Tend, int]]


@pytest.fixture
def start_socks(run_tend: Callable[..., Tend]) -> StartSocks:
    """Start `tend socks` on a free port with these options; return it and its port."""

    def start(*options: str) -> tuple[Tend, int]:
        socks = run_tend(*FOREGROUND, "socks", *LOCAL, *options)
        return socks, socks.wait_for_port()

    return start


def curl(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *arguments],
        capture_output=True,
        timeout=60,
        check=False,
    )


def run_client(command: list[str], data: bytes) -> bytes:
    """Run a netcat-like client with *data* on its standard input; return what it printed."""
    result = subprocess.run(command, input=data, capture_output=True, timeout=60, check=True)
    return result.stdout


# -- curl, every version -----------------------------------------------------------------------


@needs("curl")
@pytest.mark.parametrize(
    ("flag", "line"),
    [
        ("--socks4", r"socks4 127\.0\.0\.1:\d+ to 127\.0\.0\.1:{port}: \d+ bytes up, {size}"),
        (
            "--socks4a",
            r"socks4a 127\.0\.0\.1:\d+ to localhost:{port} \(127\.0\.0\.1:{port}\): \d+ bytes up, "
            r"{size}",
        ),
        ("--socks5", r"socks5 127\.0\.0\.1:\d+ to 127\.0\.0\.1:{port}: \d+ bytes up, {size}"),
        (
            "--socks5-hostname",
            r"socks5 127\.0\.0\.1:\d+ to localhost:{port} \(127\.0\.0\.1:{port}\): \d+ bytes up, "
            r"{size}",
        ),
    ],
)
def test_curl_gets_through_with_every_version(
    start_socks: StartSocks, http_peer: PeerServer, flag: str, line: str
) -> None:
    """curl reaches an allowed server with SOCKS4, 4a, 5 and 5 with the name sent to the
    proxy; each connection gets one access line with the bytes each way."""
    socks, port = start_socks("--allow", "127.0.0.0/8")
    host = "127.0.0.1" if flag in ("--socks4", "--socks5") else "localhost"
    result = curl(flag, f"127.0.0.1:{port}", f"http://{host}:{http_peer.port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == HTTP_BODY
    size = len(HTTP_BODY)  # the body, and the head before it
    pattern = line.format(port=http_peer.port, size=r"(\d+) bytes down, [0-9.]+ s$")
    match = wait_until(lambda: re.search(pattern, socks.stdout, re.MULTILINE))
    assert int(match.group(1)) > size


# -- half-close: ncat and nc -N ----------------------------------------------------------------


@needs("ncat")
@pytest.mark.parametrize("kind", ["socks4", "socks5"])
def test_ncat_half_close_reaches_the_server(
    start_socks: StartSocks, eof_peer: PeerServer, kind: str
) -> None:
    """ncat sends its input, half-closes, and gets the answer the server sends only after
    that end-of-file (twistd's socks gets it 0 bytes back)."""
    _, port = start_socks("--allow", f"127.0.0.1:{eof_peer.port}")
    data = os.urandom(300_000)
    command = ["ncat", "--proxy", f"127.0.0.1:{port}", "--proxy-type", kind]
    answer = run_client([*command, "127.0.0.1", str(eof_peer.port)], data)
    assert answer == expected_answer(data)


@needs("nc")
def test_nc_half_close_through_socks5(start_socks: StartSocks, eof_peer: PeerServer) -> None:
    """`nc -N -X 5 -x` half-closes after its input; the answer still comes back."""
    _, port = start_socks("--allow", "127.0.0.0/8")
    data = b"hello, server\n" * 1000
    command = ["nc", "-N", "-X", "5", "-x", f"127.0.0.1:{port}", "127.0.0.1", str(eof_peer.port)]
    assert run_client(command, data) == expected_answer(data)


# -- users -----------------------------------------------------------------------------------


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text("# name:password\nalice:s3cret:with colons\nbob:hunter2\n")
    path.chmod(0o600)
    return path


@needs("curl")
def test_curl_with_user_and_password(
    start_socks: StartSocks, http_peer: PeerServer, users_file: Path
) -> None:
    """With --users, the right password gets through (also with ncat); a wrong one, none,
    and SOCKS4 are refused; the log names the user but never a password."""
    socks, port = start_socks("--allow", "127.0.0.0/8", "--users", str(users_file))
    url = f"http://127.0.0.1:{http_peer.port}/"
    proxy = f"127.0.0.1:{port}"
    good = curl("--socks5", proxy, "--proxy-user", "alice:s3cret:with colons", url)
    assert good.returncode == 0, good.stderr
    assert good.stdout == HTTP_BODY
    hostname = curl("-x", f"socks5h://bob:hunter2@{proxy}", url)
    assert hostname.stdout == HTTP_BODY
    wrong = curl("--socks5", proxy, "--proxy-user", "alice:guess", url)
    assert wrong.returncode == 97
    assert b"User was rejected by the SOCKS5 server" in wrong.stderr
    none = curl("--socks5", proxy, url)
    assert none.returncode == 97
    assert b"No authentication method was acceptable" in none.stderr
    version4 = curl("--socks4", proxy, url)
    assert version4.returncode == 97
    assert b"(91)" in version4.stderr
    assert http_peer.connections == 2
    wait_until(lambda: socks.stdout.count("tend.builtins.socks") >= 5)
    assert "user 'alice'" in socks.stdout
    assert "refused: wrong user name or password for 'alice'" in socks.stdout
    assert "refused: SOCKS4 cannot carry a password" in socks.stdout
    for secret in ("s3cret", "hunter2", "guess"):
        assert secret not in socks.stdout


@needs("ncat")
def test_ncat_with_proxy_auth(
    start_socks: StartSocks, eof_peer: PeerServer, users_file: Path
) -> None:
    """ncat's SOCKS5 user/password works, half-close included."""
    _, port = start_socks("--allow", "127.0.0.0/8", "--users", str(users_file))
    command = ["ncat", "--proxy", f"127.0.0.1:{port}", "--proxy-type", "socks5"]
    command += ["--proxy-auth", "bob:hunter2", "127.0.0.1", str(eof_peer.port)]
    assert run_client(command, b"x" * 5000) == expected_answer(b"x" * 5000)


# -- the allow list ----------------------------------------------------------------------------


@needs("curl")
@pytest.mark.parametrize(
    ("flag", "host", "code"),
    [
        ("--socks4", "127.0.0.1", b"(91)"),
        ("--socks4a", "localhost", b"(91)"),
        ("--socks5", "127.0.0.1", b"(2)"),
        ("--socks5-hostname", "localhost", b"(2)"),
    ],
)
def test_a_destination_off_the_list_is_refused(
    start_socks: StartSocks, http_peer: PeerServer, flag: str, host: str, code: bytes
) -> None:
    """An address (or a name resolving to one) that no rule covers is refused with the
    version's code: 91 for SOCKS4 and 4a, 2 ("not allowed by ruleset") for SOCKS5. Here the
    address is listed, but for another port."""
    other_port = 1 if http_peer.port != 1 else 2
    socks, port = start_socks("--allow", f"127.0.0.0/8:{other_port}")
    result = curl(flag, f"127.0.0.1:{port}", f"http://{host}:{http_peer.port}/")
    assert result.returncode == 97
    assert code in result.stderr
    assert http_peer.connections == 0
    wait_until(lambda: "refused" in socks.stdout)
    assert "not on the allow list" in socks.stdout


@needs("curl")
def test_nothing_is_allowed_by_default(start_socks: StartSocks, http_peer: PeerServer) -> None:
    """Without --allow, every request is refused, and the start says so in one warning."""
    socks, port = start_socks()
    result = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{http_peer.port}/")
    assert result.returncode == 97
    assert b"(2)" in result.stderr
    assert http_peer.connections == 0
    assert "nothing is allowed, so every request will be refused" in socks.stdout


@needs("curl")
@pytest.mark.parametrize(
    "rules",
    [
        ("--allow", "10.0.0.0/8"),  # no rule covers 127.0.0.1
        ("--allow-host", "localhost"),  # a listed name reaches public addresses only
    ],
)
def test_a_name_resolving_to_a_denied_address_is_refused(
    start_socks: StartSocks, http_peer: PeerServer, rules: tuple[str, str]
) -> None:
    """`localhost` resolves to loopback: the resolved address is what is checked, so a name
    (even a listed one) cannot lead where --allow does not reach."""
    socks, port = start_socks(*rules)
    for flag in ("--socks5-hostname", "--socks4a"):
        result = curl(flag, f"127.0.0.1:{port}", f"http://localhost:{http_peer.port}/")
        assert result.returncode == 97, result.stderr
    assert http_peer.connections == 0
    wait_until(lambda: socks.stdout.count("it resolves to") == 2)
    assert re.search(r"refused: it resolves to [0-9a-f.:, ]*127\.0\.0\.1", socks.stdout)


@needs("curl")
def test_a_listed_name_reaches_loopback_when_allow_lists_it_too(
    start_socks: StartSocks, http_peer: PeerServer
) -> None:
    """--allow-host with --allow for the address: the name gets through."""
    _, port = start_socks("--allow-host", "localhost", "--allow", f"127.0.0.1:{http_peer.port}")
    result = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{http_peer.port}/")
    assert result.stdout == HTTP_BODY


@needs("curl")
def test_an_unlisted_name_is_not_even_looked_up(
    start_socks: StartSocks, http_peer: PeerServer
) -> None:
    """With only --allow-host rules, a name none covers is refused before any lookup."""
    socks, port = start_socks("--allow-host", "example.com")
    result = curl("--socks5-hostname", f"127.0.0.1:{port}", "http://no-such-host.invalid/")
    assert result.returncode == 97
    assert b"(2)" in result.stderr
    line = wait_until(lambda: re.search(r"^.*no-such-host\.invalid.*$", socks.stdout, re.M))
    assert "refused: not on the allow list" in line.group(0)


@needs("curl")
@pytest.mark.parametrize("host", ["0.0.0.0", "[::ffff:127.0.0.1]", "[::]"])
def test_unspecified_and_mapped_addresses_count_as_loopback(
    start_socks: StartSocks, http_peer: PeerServer, host: str
) -> None:
    """0.0.0.0 and :: (which reach the local host on Linux) and ::ffff:127.0.0.1 are
    checked as loopback: refused unless loopback is allowed, and then the proxy connects
    to the loopback address it checked."""
    _, denied_port = start_socks("--allow", "10.0.0.0/8")
    result = curl("--socks5", f"127.0.0.1:{denied_port}", f"http://{host}:{http_peer.port}/")
    assert result.returncode == 97
    assert b"(2)" in result.stderr
    assert http_peer.connections == 0
    if host == "[::]":
        return  # ::1 may have no listener here; the refusal is what counts
    allowed, port = start_socks("--allow", f"127.0.0.1:{http_peer.port}")
    result = curl("--socks5", f"127.0.0.1:{port}", f"http://{host}:{http_peer.port}/")
    assert result.stdout == HTTP_BODY
    wait_until(lambda: f"(127.0.0.1:{http_peer.port})" in allowed.stdout)


# -- what is refused outright -----------------------------------------------------------------


def exchange(port: int, *steps: tuple[bytes, int]) -> tuple[list[bytes], bytes]:
    """For each (message, size): send the message, read an answer of that size. Then read
    to the end; return the answers and what came after them (``<reset>`` for a reset)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for message, size in steps:
            sock.sendall(message)
            answers.append(read_exactly(sock, size))
        rest = b""
        try:
            while chunk := sock.recv(4096):
                rest += chunk
        except ConnectionResetError:
            rest += b"<reset>"
        return answers, rest


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"closed after {data!r}, expecting {size} bytes")
        data += chunk
    return data


GREETING = b"\x05\x01\x00"
LOOPBACK = socket.inet_aton("127.0.0.1")


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"\x05\x02\x00\x01" + LOOPBACK + b"\x00\x50", 7),  # BIND
        (b"\x05\x03\x00\x01" + LOOPBACK + b"\x00\x50", 7),  # UDP ASSOCIATE
        (b"\x05\x01\x00\x05" + LOOPBACK + b"\x00\x50", 8),  # address type 5
        (b"\x05\x01\x00\x01" + LOOPBACK + b"\x00\x00", 2),  # port 0
    ],
    ids=["bind", "udp-associate", "address-type", "port-0"],
)
def test_socks5_refusals_carry_their_codes(
    start_socks: StartSocks, request_bytes: bytes, reply: int
) -> None:
    """BIND and UDP ASSOCIATE get 7 (command not supported), an unknown address type 8,
    port 0 gets 2; each reply is whole, then the connection closes."""
    _, port = start_socks("--allow", "127.0.0.0/8")
    answers, rest = exchange(port, (GREETING, 2), (request_bytes, 10))
    assert answers[0] == b"\x05\x00"
    assert answers[1] == bytes((5, reply, 0, 1, 0, 0, 0, 0, 0, 0))
    assert rest == b""


def test_socks4_bind_is_refused(start_socks: StartSocks) -> None:
    """SOCKS4 BIND gets 91 (twistd's crashes and leaves a listener on 0.0.0.0)."""
    _, port = start_socks("--allow", "127.0.0.0/8")
    request = struct.pack("!BBH4s", 4, 2, 80, LOOPBACK) + b"user\0"
    answers, rest = exchange(port, (request, 8))
    assert answers[0][:2] == b"\x00\x5b"
    assert rest == b""


@pytest.mark.parametrize(
    ("opening", "why"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "version 71, neither 4 nor 5"),
        (struct.pack("!BBH4s", 4, 1, 80, LOOPBACK) + b"u" * 300, "a user id longer than 255"),
        (b"\x05\x01\x02\x05\x07", "user/password version 5, not 1"),
    ],
    ids=["http", "long-user-id", "bad-login"],
)
def test_a_handshake_that_is_not_socks_is_closed(
    start_socks: StartSocks, users_file: Path, opening: bytes, why: str
) -> None:
    """Bytes that are not a SOCKS handshake close the connection with a reset; the line says why."""
    socks, port = start_socks("--allow", "127.0.0.0/8", "--users", str(users_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(opening)
        with pytest.raises(ConnectionResetError):
            read_to_end(sock)
    wait_until(lambda: why in socks.stdout)


def test_a_silent_client_is_closed_after_the_handshake_timeout(start_socks: StartSocks) -> None:
    """A client that connects and says nothing (or too little) is cut off."""
    socks, port = start_socks("--allow", "127.0.0.0/8", "--handshake-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x05\x01")  # half a greeting
        with pytest.raises(ConnectionResetError):
            sock.recv(4096)
    wait_until(lambda: "no whole handshake within 0.3 s" in socks.stdout)


def test_clients_past_the_cap_are_closed(start_socks: StartSocks) -> None:
    """With --max-connections 2, a third client is closed at once while two are open."""
    socks, port = start_socks("--allow", "127.0.0.0/8", "--max-connections", "2")
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for sock in (first, second):  # each is admitted and answered
            sock.sendall(GREETING)
            assert read_exactly(sock, 2) == b"\x05\x00"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            assert third.recv(4096) == b""
        wait_until(lambda: "refused: 2 connections are open already" in socks.stdout)
    finally:
        first.close()
        second.close()
    # Once both have gone, a new client is admitted again.
    wait_until(lambda: socks.stdout.count("closed by the client before saying") == 2)
    wait_until(lambda: greeted(port))


def greeted(port: int) -> bool:
    """Whether a SOCKS5 greeting on *port* is answered (not closed by the cap)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(GREETING)
        return sock.recv(2) == b"\x05\x00"


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


# -- listening, options, files ----------------------------------------------------------------


@needs("curl")
def test_listen_repeats(run_tend: Callable[..., Tend], http_peer: PeerServer) -> None:
    """Each --listen adds a listener; on loopback, none gets a warning."""
    second = ("--listen", "tcp:0:interface=127.0.0.2")
    socks = run_tend(*FOREGROUND, "socks", *LOCAL, *second, "--allow", "127.0.0.0/8")
    ports = wait_until(lambda: _two_ports(socks.stdout))
    for host, port in zip(("127.0.0.1", "127.0.0.2"), ports, strict=True):
        result = curl("--socks5", f"{host}:{port}", f"http://127.0.0.1:{http_peer.port}/")
        assert result.stdout == HTTP_BODY
    assert "which other hosts can reach" not in socks.stdout


def _two_ports(output: str) -> list[str] | None:
    found = re.findall(r"SocksFactory starting on (\d+)", output)
    return found if len(found) == 2 else None


OFFLINE = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare, to listen on every interface of a network namespace",
)
def test_a_listener_other_hosts_can_reach_gets_one_warning(tmp_path: Path) -> None:
    """Listening on 0.0.0.0 (here in a network namespace of its own) logs one warning."""
    anywhere = ("--listen", "tcp:0:interface=0.0.0.0")
    command = [*OFFLINE, *TEND, *FOREGROUND, "socks", *LOCAL, *anywhere]
    socks = Spawned(command, tmp_path, None)
    try:
        wait_until(lambda: _two_ports(socks.stdout))
        warnings = [line for line in socks.stdout.splitlines() if "other hosts can reach" in line]
        assert len(warnings) == 1
        assert re.search(r"listening on 0\.0\.0\.0:\d+, which other hosts can reach", warnings[0])
    finally:
        socks.kill()


@needs("curl")
def test_a_deployment_file_runs_it(
    run_tend: Callable[..., Tend], http_peer: PeerServer, tmp_path: Path
) -> None:
    """socks runs from a deployment file; several rules are an array there."""
    (tmp_path / "deploy.toml").write_text(
        "[[service]]\n"
        'plugin = "socks"\n'
        'listen = "tcp:0:interface=127.0.0.1"\n'
        f'allow = ["10.0.0.0/8", "127.0.0.1:{http_peer.port}"]\n'
        "handshake-timeout = 5\n"
    )
    socks = run_tend(*FOREGROUND, "-c", "deploy.toml")
    port = socks.wait_for_port()
    result = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{http_peer.port}/")
    assert result.stdout == HTTP_BODY


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--allow", "300.0.0.0/8"), "argument --allow: invalid address or network '300.0.0.0/8'"),
        (("--allow", "10.0.0.0/8:0"), "argument --allow: invalid ports in '10.0.0.0/8:0'"),
        (("--allow", "10.0.0.0/8:90-80"), "invalid ports in '10.0.0.0/8:90-80'"),
        (("--allow", "[::1]80"), "argument --allow: invalid address or network '[::1]80'"),
        (("--allow-host", "a..b"), "argument --allow-host: invalid host name 'a..b'"),
        (("--allow-host", "x.com:http"), "invalid ports in 'x.com:http'"),
        (("--listen", "tcp:abc"), "argument --listen: invalid endpoint 'tcp:abc'"),
        (("--max-connections", "0"), "argument --max-connections: invalid count '0'"),
        (("--handshake-timeout", "0"), "argument --handshake-timeout: invalid duration '0'"),
        (("--idle-timeout", "-1"), "argument --idle-timeout: invalid duration '-1'"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    tmp_path: Path, options: tuple[str, ...], message: str
) -> None:
    """Each bad option value is one line naming the option, then the help hint; exit 2."""
    result = run_once(*FOREGROUND, "socks", *LOCAL, *options, cwd=tmp_path)
    assert result.returncode == 2
    assert_usage_error(result.stderr, "socks", message)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read users file '{path}': No such file or directory"),
        ("alice\n", "cannot use users file '{path}': line 1 has no ':'"),
        ("# nobody\n\n", "cannot use users file '{path}': it lists no users"),
        ("alice:x\nalice:y\n", "line 2: user 'alice' is listed twice"),
        (":secret\n", "line 1: the name and the password must each be 1 to 255 bytes"),
    ],
    ids=["missing", "no-colon", "empty", "twice", "no-name"],
)
def test_a_bad_users_file_is_one_line_and_exit_1(
    tmp_path: Path, content: str | None, message: str
) -> None:
    """The users file is read at start: a problem is one line (never a password); exit 1."""
    path = tmp_path / "users"
    if content is not None:
        path.write_text(content)
    result = run_once(*FOREGROUND, "socks", *LOCAL, "--users", str(path), cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert message.format(path=path) in lines[0]
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stdout


def test_a_users_file_others_can_read_gets_a_warning(
    start_socks: StartSocks, users_file: Path
) -> None:
    """A users file readable by other users still works, with a warning to chmod it."""
    users_file.chmod(0o644)
    socks, _ = start_socks("--allow", "127.0.0.0/8", "--users", str(users_file))
    assert "can be read by other users; make it private: chmod 600" in socks.stdout


@needs("curl")
def test_the_proxy_will_not_relay_to_itself(start_socks: StartSocks) -> None:
    """A request for the proxy's own listener is refused, so clients cannot chain it into
    itself until its connections run out."""
    socks, port = start_socks("--allow", "127.0.0.0/8")
    result = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/")
    assert result.returncode == 97
    assert b"(2)" in result.stderr
    wait_until(lambda: "refused: that is this proxy itself" in socks.stdout)
    # By name (socks5h: the proxy resolves it), the line says why as well.
    result = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://localhost:{port}/")
    assert result.returncode == 97
    wait_until(lambda: re.search(r"it resolves to [^,]*, this proxy itself", socks.stdout))


# -- the rules, without a proxy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network", "ports"),
    [
        ("127.0.0.0/8", "127.0.0.0/8", ()),
        ("10.1.2.3", "10.1.2.3/32", ()),
        ("10.1.2.3:22", "10.1.2.3/32", ((22, 22),)),
        ("10.0.0.0/8:80,443,8000-8100", "10.0.0.0/8", ((80, 80), (443, 443), (8000, 8100))),
        ("192.168.1.7/24", "192.168.1.0/24", ()),
        ("::1", "::1/128", ()),
        ("[::1]:8080", "::1/128", ((8080, 8080),)),
        ("[fd00::]/8:443", "fd00::/8", ((443, 443),)),
        ("fd00::/8:443", "fd00::/8", ((443, 443),)),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8", ()),
    ],
)
def test_allow_rules_read_as_written(
    text: str, network: str, ports: tuple[tuple[int, int], ...]
) -> None:
    """--allow takes IPv4 and IPv6 networks, ports after a colon (IPv6 in brackets), and an
    IPv4-mapped network as the IPv4 network it is."""
    rule = parse_network_rule(text)
    assert str(rule.network) == network
    assert rule.ports.ranges == ports


def test_a_host_rule_covers_the_name_and_the_names_below_it() -> None:
    """example.com covers www.example.com, not badexample.com; names compare in lower case."""
    rule = parse_host_rule("Example.COM.:443")
    assert rule.matches("example.com")
    assert rule.matches("www.example.com")
    assert not rule.matches("badexample.com")
    assert not rule.matches("example.com.evil.net")
    assert rule.ports.allow(443)
    assert not rule.ports.allow(80)


@pytest.mark.parametrize(
    ("requested", "checked"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("::ffff:0.0.0.0", "127.0.0.1"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_addresses_are_checked_as_the_kernel_treats_them(requested: str, checked: str) -> None:
    """IPv4-mapped addresses are checked as IPv4, the unspecified address as loopback."""
    assert normalised(ipaddress.ip_address(requested)) == ipaddress.ip_address(checked)


def test_a_listed_name_reaches_only_public_addresses() -> None:
    """A name on --allow-host reaches a public address, not loopback, private or
    link-local ones unless --allow lists them."""
    policy = Policy(hosts=(parse_host_rule("example.com"),))
    public = ipaddress.ip_address("93.184.215.14")
    assert policy.allows_resolved("www.example.com", public, 443)
    for internal in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fd00::1"):
        assert not policy.allows_resolved("www.example.com", ipaddress.ip_address(internal), 80)
    assert not policy.allows_resolved("example.org", public, 443)
    widened = Policy(networks=(parse_network_rule("10.0.0.0/8"),), hosts=policy.hosts)
    assert widened.allows_resolved("www.example.com", ipaddress.ip_address("10.0.0.1"), 80)
