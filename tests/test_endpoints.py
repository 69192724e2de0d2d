"""Tests for tend.endpoints: parsing descriptions, and binding the sockets they describe."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tend.endpoints import (
    DEFAULT_BACKLOG,
    Endpoint,
    EndpointSyntaxError,
    ListenError,
    SystemdEndpoint,
    TCPEndpoint,
    TLSEndpoint,
    UNIXEndpoint,
    describe_socket,
    parse_endpoint,
)
from tend.errors import StartupError, TendError, quote


def listen(endpoint: Endpoint) -> list[socket.socket]:
    """Bind *endpoint* once, as a server without workers does, and return its sockets."""
    return endpoint.listen().sockets


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for UNIX sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tend-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    """Sockets a test opened; each is closed at the end, even when the test fails."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def has_ipv6_loopback() -> bool:
    """True if ::1 can be bound on this machine."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def listen_backlog(sock: socket.socket) -> int:
    """The accept-queue length the kernel reports for a listening socket (``ss``'s Send-Q)."""
    if sock.family == socket.AF_UNIX:
        # u_str LISTEN Recv-Q Send-Q PATH ...
        command, column = ["ss", "-Hlx", "src", str(sock.getsockname())], 3
    else:
        # LISTEN Recv-Q Send-Q ADDRESS:PORT ...
        command, column = ["ss", "-Hltn", f"sport = :{sock.getsockname()[1]}"], 2
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    (line,) = output.splitlines()
    return int(line.split()[column])


# Parsing


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("10000", TCPEndpoint(10000)),
        (" 10000\n", TCPEndpoint(10000)),
        ("0", TCPEndpoint(0)),
        ("tcp:10000", TCPEndpoint(10000)),
        ("TCP:10000", TCPEndpoint(10000)),
        ("tcp:10000:interface=127.0.0.1", TCPEndpoint(10000, "127.0.0.1")),
        ("tcp:port=10000", TCPEndpoint(10000)),
        ("tcp:port=10000:interface=127.0.0.1", TCPEndpoint(10000, "127.0.0.1")),
        (r"tcp:0:interface=\:\:1", TCPEndpoint(0, "::1")),
        ("tcp:8000:backlog=50", TCPEndpoint(8000, backlog=50)),
        ("tcp:8000:reusePort=yes", TCPEndpoint(8000, reuse_port=True)),
        ("tcp:8000:reusePort=true", TCPEndpoint(8000, reuse_port=True)),
        ("tcp:8000:reusePort=no", TCPEndpoint(8000, reuse_port=False)),
        ("tcp:65535", TCPEndpoint(65535)),
        ("unix:/run/poetry.sock", UNIXEndpoint("/run/poetry.sock")),
        ("unix:/run/poetry.sock:mode=0660", UNIXEndpoint("/run/poetry.sock", 0o660)),
        ("unix:/run/poetry.sock:mode=660", UNIXEndpoint("/run/poetry.sock", 0o660)),
        ("unix:address=/run/poetry.sock", UNIXEndpoint("/run/poetry.sock")),
        # Made absolute: the daemon changes directory before removing the file.
        ("unix:relative.sock:backlog=7", UNIXEndpoint(os.path.abspath("relative.sock"), backlog=7)),
        (r"unix:/tmp/a\:b.sock", UNIXEndpoint("/tmp/a:b.sock")),
    ],
)
def test_parses_a_description(description: str, expected: TCPEndpoint | UNIXEndpoint) -> None:
    """Each supported description parses to the endpoint it names."""
    assert parse_endpoint(description) == expected


def test_bare_port_listens_on_the_default_interface() -> None:
    """A bare port number means TCP on the default interface given."""
    assert parse_endpoint("10000", "127.0.0.1") == TCPEndpoint(10000, "127.0.0.1")


def test_tcp_without_interface_uses_the_default_interface() -> None:
    """tcp:PORT without interface= uses the default interface; interface= overrides it."""
    assert parse_endpoint("tcp:10000", "localhost") == TCPEndpoint(10000, "localhost")
    assert parse_endpoint("tcp:10000:interface=0.0.0.0", "localhost") == TCPEndpoint(
        10000, "0.0.0.0"
    )


def test_default_backlog_is_1024() -> None:
    """Every kind of endpoint asks for a backlog of 1024 unless told otherwise."""
    assert DEFAULT_BACKLOG == 1024
    assert parse_endpoint("10000").backlog == 1024
    assert parse_endpoint("tcp:10000").backlog == 1024
    assert parse_endpoint("unix:/run/x.sock").backlog == 1024


def test_endpoints_describe_themselves_as_addresses() -> None:
    """str() of an endpoint reads as an address: IPv6 in brackets, every interface as 0.0.0.0."""
    assert str(parse_endpoint("tcp:10000:interface=127.0.0.1")) == "127.0.0.1:10000"
    assert str(parse_endpoint(r"tcp:10000:interface=\:\:1")) == "[::1]:10000"
    assert str(parse_endpoint("10000")) == "0.0.0.0:10000"
    assert str(parse_endpoint("unix:/run/x.sock")) == "/run/x.sock"


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("tcp:abc", "port must be a number from 0 to 65535"),
        ("tcp:65536", "port must be a number from 0 to 65535"),
        ("99999", "port must be a number from 0 to 65535"),
        ("tcp:", "port must be a number from 0 to 65535"),
        ("tcp:port=-1", "port must be a number from 0 to 65535"),
        ("tcp:interface=127.0.0.1", "no port given"),
        ("tcp:80:81", "too many fields"),
        ("tcp:80:port=81", "too many fields"),
        ("sctp:80", "unknown kind 'sctp'"),
        ("", "unknown kind ''"),
        ("tcp:80:colour=blue", "unknown option 'colour'"),
        ("unix:/run/x.sock:interface=lo", "unknown option 'interface'"),
        ("tcp:80:interface=127.0.0.1:extra", "'extra' comes after a key=value field"),
        ("tcp:80:backlog=0", "backlog must be a positive number"),
        ("tcp:80:backlog=many", "backlog must be a positive number"),
        ("tcp:80:reusePort=maybe", "reusePort must be yes or no"),
        ("ssl:8443", "no certificate given"),
        ("tls:8443:interface=127.0.0.1", "no certificate given"),
        ("systemd", "expected systemd:index=N or systemd:name=NAME"),
        ("systemd:0", "expected systemd:index=N or systemd:name=NAME"),
        ("systemd:index=0:name=web", "expected systemd:index=N or systemd:name=NAME"),
        ("systemd:name=", "expected systemd:index=N or systemd:name=NAME"),
        ("systemd:index=first", "index must be a number from 0"),
        ("systemd:index=-1", "index must be a number from 0"),
        ("systemd:index=0:domain=IPX", "domain must be INET, INET6 or UNIX"),
        ("systemd:index=0:interface=lo", "unknown option 'interface'"),
        ("systemd:index=0:backlog=0", "backlog must be a positive number"),
        ("unix:", "expected unix:PATH"),
        ("unix:address=", "expected unix:PATH"),
        ("unix:/a.sock:/b.sock", "expected unix:PATH"),
        ("unix:/run/x.sock:mode=rw", "mode must be octal from 000 to 777, like 0660"),
        ("unix:/run/x.sock:mode=0999", "mode must be octal from 000 to 777, like 0660"),
    ],
)
def test_rejects_a_bad_description(description: str, reason: str) -> None:
    """A bad description is an EndpointSyntaxError quoting the description and the reason."""
    with pytest.raises(EndpointSyntaxError) as caught:
        parse_endpoint(description)

    message = str(caught.value)
    assert message.startswith(f"invalid endpoint {description!r}: ")
    assert reason in message


def test_rejects_a_port_written_with_non_ascii_digits() -> None:
    """A port or backlog of Unicode digits int() cannot read is a syntax error, not a crash."""
    with pytest.raises(EndpointSyntaxError, match="port must be a number"):
        parse_endpoint("tcp:\u00b2")
    with pytest.raises(EndpointSyntaxError, match="port must be a number"):
        parse_endpoint("\u00b2")
    with pytest.raises(EndpointSyntaxError, match="backlog must be a positive number"):
        parse_endpoint("tcp:80:backlog=\u00b2")


def test_unknown_kind_says_what_is_expected() -> None:
    """An unknown kind lists the forms that are understood."""
    with pytest.raises(EndpointSyntaxError) as caught:
        parse_endpoint("udp:53")
    assert str(caught.value) == (
        "invalid endpoint 'udp:53': unknown kind 'udp'; "
        "expected PORT, tcp:, unix:, tls: or systemd:"
    )


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tls:8443:certKey=/etc/tend/cert.pem:privateKey=/etc/tend/key.pem",
         TLSEndpoint(8443, "/etc/tend/cert.pem", "/etc/tend/key.pem", "localhost")),
        ("tls:8443:certKey=/etc/tend/both.pem",
         TLSEndpoint(8443, "/etc/tend/both.pem", "/etc/tend/both.pem", "localhost")),
        (r"ssl:443:privateKey=/k.pem:certKey=/c.pem:interface=\:\:1:backlog=5",
         TLSEndpoint(443, "/c.pem", "/k.pem", "::1", backlog=5)),
        ("systemd:index=0", SystemdEndpoint(index=0)),
        ("systemd:name=poetry:backlog=10", SystemdEndpoint(name="poetry", backlog=10)),
        ("systemd:domain=INET6:index=1", SystemdEndpoint(index=1, domain="INET6")),
    ],
)  # fmt: skip
def test_parses_tls_and_systemd_descriptions(
    description: str, expected: TLSEndpoint | SystemdEndpoint
) -> None:
    """tls: (alias ssl:) takes twistd's certKey/privateKey; systemd: an index or a name."""
    assert parse_endpoint(description, "localhost") == expected


def test_tls_and_systemd_endpoints_describe_themselves() -> None:
    """A TLS endpoint reads as its address; a systemd one as its description."""
    assert str(parse_endpoint("tls:8443:certKey=/c.pem:interface=127.0.0.1")) == "127.0.0.1:8443"
    assert str(parse_endpoint("systemd:index=2")) == "systemd:index=2"
    assert str(parse_endpoint("systemd:name=web:domain=INET")) == "systemd:name=web"


def test_syntax_error_is_a_value_error_and_a_tend_error() -> None:
    """EndpointSyntaxError is a ValueError (so argparse types can raise it) and a TendError."""
    assert issubclass(EndpointSyntaxError, ValueError)
    assert issubclass(EndpointSyntaxError, TendError)
    assert issubclass(ListenError, StartupError)


# TCP listeners


def test_listens_on_port_zero_and_reads_the_port_back(opened: list[socket.socket]) -> None:
    """Port 0 binds a free port, which the returned socket reports; a client can connect."""
    sockets = listen(parse_endpoint("tcp:0:interface=127.0.0.1"))
    opened.extend(sockets)

    (sock,) = sockets
    host, port = sock.getsockname()
    assert host == "127.0.0.1"
    assert port != 0
    assert sock.family == socket.AF_INET
    assert sock.type == socket.SOCK_STREAM
    assert not sock.getblocking()
    assert describe_socket(sock) == f"127.0.0.1:{port}"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_localhost_gives_sockets_all_on_one_port(opened: list[socket.socket]) -> None:
    """`localhost` binds one socket per address it names, every one on the same port."""
    families = {info[0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    sockets = listen(parse_endpoint("tcp:0:interface=localhost"))
    opened.extend(sockets)

    assert 1 <= len(sockets) <= 2
    assert {sock.family for sock in sockets} == families
    ports = {sock.getsockname()[1] for sock in sockets}
    assert len(ports) == 1
    assert ports != {0}


def test_every_interface_is_the_default(opened: list[socket.socket]) -> None:
    """A bare port with no interface binds 0.0.0.0."""
    sockets = listen(parse_endpoint("0"))
    opened.extend(sockets)

    (sock,) = sockets
    assert sock.getsockname()[0] == "0.0.0.0"


@pytest.mark.skipif(not has_ipv6_loopback(), reason="needs an IPv6 loopback")
def test_listens_on_an_escaped_ipv6_address(opened: list[socket.socket]) -> None:
    """An escaped IPv6 interface binds an IPv6-only socket that describes itself in brackets."""
    sockets = listen(parse_endpoint(r"tcp:0:interface=\:\:1"))
    opened.extend(sockets)

    (sock,) = sockets
    assert sock.family == socket.AF_INET6
    assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    port = sock.getsockname()[1]
    assert describe_socket(sock) == f"[::1]:{port}"
    with socket.create_connection(("::1", port), timeout=5):
        pass


def test_busy_port_is_a_listen_error_with_a_one_line_reason(opened: list[socket.socket]) -> None:
    """Listening on a port already listened on says `cannot listen on HOST:PORT: address ...`."""
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opened.append(busy)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]

    with pytest.raises(ListenError) as caught:
        listen(parse_endpoint(f"tcp:{port}:interface=127.0.0.1"))

    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"


def test_reuse_port_lets_two_listeners_share_a_port(opened: list[socket.socket]) -> None:
    """With reusePort=yes, a second listener may bind the port the first one holds."""
    first = listen(parse_endpoint("tcp:0:interface=127.0.0.1:reusePort=yes"))
    opened.extend(first)
    port = first[0].getsockname()[1]

    second = listen(parse_endpoint(f"tcp:{port}:interface=127.0.0.1:reusePort=yes"))
    opened.extend(second)

    assert second[0].getsockname() == ("127.0.0.1", port)
    assert second[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss to read a listen backlog")
def test_listens_with_the_default_backlog(opened: list[socket.socket]) -> None:
    """A TCP listener's accept queue is 1024 unless backlog= says otherwise."""
    (default,) = listen(parse_endpoint("tcp:0:interface=127.0.0.1"))
    opened.append(default)
    (small,) = listen(parse_endpoint("tcp:0:interface=127.0.0.1:backlog=7"))
    opened.append(small)

    with open("/proc/sys/net/core/somaxconn") as file:
        ceiling = int(file.read())
    assert listen_backlog(default) == min(DEFAULT_BACKLOG, ceiling)
    assert listen_backlog(small) == 7


# UNIX listeners


def test_listens_on_a_unix_socket(short_dir: Path, opened: list[socket.socket]) -> None:
    """unix:PATH binds and listens on a socket file a client can connect to."""
    path = short_dir / "poetry.sock"
    sockets = listen(parse_endpoint(f"unix:{path}"))
    opened.extend(sockets)

    (sock,) = sockets
    assert sock.family == socket.AF_UNIX
    assert not sock.getblocking()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert describe_socket(sock) == str(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))


def test_unix_socket_gets_the_mode_asked_for(short_dir: Path, opened: list[socket.socket]) -> None:
    """mode=0660 sets the socket file's permission bits to exactly 0660."""
    path = short_dir / "poetry.sock"
    opened.extend(listen(parse_endpoint(f"unix:{path}:mode=0660")))

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss to read a listen backlog")
def test_unix_socket_listens_with_the_backlog_asked_for(
    short_dir: Path, opened: list[socket.socket]
) -> None:
    """A UNIX listener uses the default backlog, or the one backlog= gives."""
    default_path = short_dir / "default.sock"
    small_path = short_dir / "small.sock"
    opened.extend(listen(parse_endpoint(f"unix:{default_path}")))
    opened.extend(listen(parse_endpoint(f"unix:{small_path}:backlog=7")))

    with open("/proc/sys/net/core/somaxconn") as file:
        ceiling = int(file.read())
    assert listen_backlog(opened[0]) == min(DEFAULT_BACKLOG, ceiling)
    assert listen_backlog(opened[1]) == 7


def test_replaces_a_stale_unix_socket(short_dir: Path, opened: list[socket.socket]) -> None:
    """A socket file left by a listener that has closed is replaced by the new listener."""
    path = short_dir / "poetry.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
        dead.listen()
    assert path.exists()

    sockets = listen(parse_endpoint(f"unix:{path}"))
    opened.extend(sockets)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))


def test_refuses_a_live_unix_socket(short_dir: Path, opened: list[socket.socket]) -> None:
    """A socket file another listener still serves is left alone: `address already in use`."""
    path = short_dir / "poetry.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    opened.append(live)
    live.bind(str(path))
    live.listen()

    with pytest.raises(ListenError) as caught:
        listen(parse_endpoint(f"unix:{path}"))

    assert str(caught.value) == f"cannot listen on {quote(str(path))}: address already in use"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))


def test_refuses_to_replace_a_file_that_is_not_a_socket(short_dir: Path) -> None:
    """A regular file at the socket's path is neither removed nor listened on."""
    path = short_dir / "poetry.sock"
    path.write_text("not a socket")

    with pytest.raises(ListenError, match=r"^cannot listen on .*: address already in use$"):
        listen(parse_endpoint(f"unix:{path}"))

    assert path.read_text() == "not a socket"


def test_unix_socket_in_a_missing_folder_is_a_listen_error(short_dir: Path) -> None:
    """A socket path whose folder does not exist is a one-line ListenError naming the path."""
    path = short_dir / "missing" / "poetry.sock"

    with pytest.raises(ListenError) as caught:
        listen(parse_endpoint(f"unix:{path}"))

    assert str(caught.value) == f"cannot listen on {quote(str(path))}: No such file or directory"
    assert not path.parent.exists()


def test_a_copy_closed_for_a_dead_worker_sends_clients_to_the_others() -> None:
    """close_copy: new clients all reach the copy left; reopen_copy binds the port again."""
    listening = parse_endpoint("tcp:0:interface=127.0.0.1").listen(copies=2)
    try:
        port = listening.copies[0][0].getsockname()[1]
        listening.close_copy(1)
        assert listening.copies[1] == []
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = listening.copies[0][0].accept()  # never queued on a closed copy
                conn.close()
        listening.reopen_copy(1)
        assert listening.copies[1][0].getsockname()[1] == port
    finally:
        listening.close()


def test_a_shared_socket_is_never_closed_for_one_worker(tmp_path: Path) -> None:
    """A UNIX socket, shared by every worker, stays open when one worker dies."""
    listening = parse_endpoint(f"unix:{tmp_path / 's.sock'}").listen(copies=2)
    try:
        listening.close_copy(0)
        assert listening.sockets
    finally:
        listening.close()


@pytest.mark.parametrize(
    ("description", "reason"),
    [
        ("a=b", "it must begin with its kind or a port"),
        ("backlog=5", "it must begin with its kind or a port"),
        ("=", "it must begin with its kind or a port"),
        ("tcp:1:backlog=1:backlog=2", "'backlog' is given twice"),
        ("tcp:1:backlog=2147483648", "backlog must be a positive number"),
        ("tcp:1:backlog=0", "backlog must be a positive number"),
        ("unix:s.sock:mode=-1", "mode must be octal from 000 to 777"),
        ("unix:s.sock:mode=77777777777", "mode must be octal from 000 to 777"),
        ("unix:s.sock:mode=4755", "mode must be octal from 000 to 777"),
        ("tcp:1:interface=" + "a" * 64, "is neither an IP address nor a host name"),
        ("tcp:1:interface=a..b", "is neither an IP address nor a host name"),
        ("tcp:1:interface=\u202e", "is neither an IP address nor a host name"),
        ("tcp:1:interface=\x1b[31m", "is neither an IP address nor a host name"),
        ("tcp:²", "port must be a number"),
    ],
)
def test_odd_descriptions_are_one_line_syntax_errors(description: str, reason: str) -> None:
    """Descriptions that once raised IndexError or overflowed later: one line, at parse."""
    with pytest.raises(EndpointSyntaxError) as caught:
        parse_endpoint(description)
    message = str(caught.value)
    assert reason in message
    assert message.isprintable()
    assert len(message) <= 160


def test_a_unix_socket_is_made_with_its_mode_not_changed_after(tmp_path: Path) -> None:
    """mode=0600: the socket file has that mode from its creation (no chmod of a path)."""
    path = tmp_path / "s.sock"
    listening = parse_endpoint(f"unix:{path}:mode=0600").listen()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        listening.close()
    assert not path.exists()
