"""tend web with real clients: curl, wget, Python's http.client and raw sockets.

Each test starts a real ``tend web`` on 127.0.0.1 (port 0, read back from the log) over a
small tree made in tmp_path, with a secret outside the root that nothing may reveal.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PASS_SOCKET, TEND, Spawned, Tend, assert_usage_error, wait_until

from tend.builtins.httpfiles import parse_ranges

CURL = shutil.which("curl")
WGET = shutil.which("wget")
needs_curl = pytest.mark.skipif(CURL is None, reason="needs curl (make test installs it)")
needs_wget = pytest.mark.skipif(WGET is None, reason="needs wget (make test installs it)")
FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--listen", "tcp:0:interface=127.0.0.1"]
SECRET = b"TOP SECRET outside the root"
HELLO = b"hello, tend web\n"
BIG = random.Random(12).randbytes(1536 * 1024)
NASTY = "<img src=x onerror=alert(1)>.txt"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A served tree, with a secret beside it and symlinks that lead to it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "evil.com").mkdir()
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(BIG)
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "index.html").write_bytes(b"<h1>sub</h1>\n")
    (root / "sub" / "deeper" / "note.txt").write_bytes(b"a note, deeper down\n")
    (root / "docs" / "a b&c.txt").write_bytes(b"spaces and an ampersand\n")
    (root / "docs" / "<script>.txt").write_bytes(b"angle brackets\n")
    (root / "docs" / NASTY).write_bytes(b"an attribute\n")
    (root / ".env").write_bytes(b"PASSWORD=" + SECRET)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(SECRET)
    (root / "escape.txt").symlink_to("../outside/secret.txt")
    (root / "escape_dir").symlink_to(outside)
    (root / "public").symlink_to(".git")
    (root / "alias.txt").symlink_to("hello.txt")
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")  # opening it for reading would wait for a writer
    return root


def start_web(run_tend: Callable[..., Tend], root: Path, *options: str, loop: str = "") -> int:
    """Start tend web on *root*; return its port."""
    runner = ["--loop", loop] if loop else []
    tend = run_tend(*FOREGROUND, *runner, "web", "--path", str(root), *LOCAL, *options)
    return tend.wait_for_port()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "10", *args],
        capture_output=True,
        timeout=20,
        check=False,
    )


def status(port: int, path: str, *args: str) -> int:
    """The status curl gets for *path*, sent exactly as written (--path-as-is)."""
    done = curl(
        "--path-as-is",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        *args,
        f"http://127.0.0.1:{port}{path}",
    )
    return int(done.stdout)


def head_and_body(port: int, path: str, *args: str) -> tuple[dict[str, str], bytes]:
    """curl -i: the last response's headers (lower-case names) and its body."""
    done = curl("-i", *args, f"http://127.0.0.1:{port}{path}")
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {"status": lines[0].split()[1]}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# -- what a GET and a HEAD get ---------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serves_files_with_their_headers(
    run_tend: Callable[..., Tend], root: Path, loop: str
) -> None:
    """A file comes whole with type, length, Last-Modified, ETag, Date; big ones too."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    port = start_web(run_tend, root, loop=loop)
    headers, body = head_and_body(port, "/hello.txt")
    assert headers["status"] == "200"
    assert body == HELLO
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == str(len(HELLO))
    assert headers["accept-ranges"] == "bytes"
    assert headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', headers["etag"])
    for name in ("date", "last-modified"):
        assert headers[name].endswith(" GMT")
    assert curl(f"http://127.0.0.1:{port}/big.bin").stdout == BIG
    assert curl(f"http://127.0.0.1:{port}/empty.txt").stdout == b""
    assert curl(f"http://127.0.0.1:{port}/alias.txt").stdout == HELLO  # a link inside


@needs_curl
def test_head_gives_the_headers_alone(run_tend: Callable[..., Tend], root: Path) -> None:
    """curl -I: the GET's headers, Content-Length included, and no body."""
    port = start_web(run_tend, root)
    done = curl("-I", f"http://127.0.0.1:{port}/big.bin")
    assert done.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"content-length: {len(BIG)}\r\n".encode() in done.stdout
    assert done.stdout.endswith(b"\r\n\r\n")


@needs_curl
def test_other_methods_get_405_with_allow(run_tend: Callable[..., Tend], root: Path) -> None:
    """POST, PUT, DELETE and OPTIONS are refused with Allow: GET, HEAD."""
    port = start_web(run_tend, root)
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        headers, _ = head_and_body(port, "/hello.txt", "-X", method, "-d", "x=1")
        assert headers["status"] == "405"
        assert headers["allow"] == "GET, HEAD"


# -- conditional requests and ranges ------------------------------------------------------


@needs_curl
def test_conditional_requests_get_304(run_tend: Callable[..., Tend], root: Path) -> None:
    """curl -z (If-Modified-Since) and If-None-Match with the ETag give 304; stale ones 200."""
    port = start_web(run_tend, root)
    url = f"http://127.0.0.1:{port}/hello.txt"
    assert status(port, "/hello.txt", "-z", str(root / "hello.txt")) == 304
    assert status(port, "/hello.txt", "-z", "1 Jan 2000") == 200
    headers, _ = head_and_body(port, "/hello.txt")
    etag = headers["etag"]
    not_modified, body = head_and_body(port, "/hello.txt", "-H", f"If-None-Match: {etag}")
    assert not_modified["status"] == "304"
    assert not_modified["etag"] == etag
    assert body == b""
    assert status(port, "/hello.txt", "-H", 'If-None-Match: "other"') == 200
    assert curl("-z", str(root / "hello.txt"), url).stdout == b""
    # A date later than now is invalid (RFC 9110 §13.1.3): ignored, the file comes.
    future = "If-Modified-Since: Sat, 01 Jan 9999 00:00:00 GMT"
    assert status(port, "/hello.txt", "-H", future) == 200


@needs_curl
def test_a_file_named_as_a_folder_is_not_found(run_tend: Callable[..., Tend], root: Path) -> None:
    """/hello.txt/ names a folder; hello.txt is a file: 404, as nginx and Apache answer."""
    port = start_web(run_tend, root)
    assert status(port, "/hello.txt/") == 404
    assert status(port, "/big.bin/") == 404
    assert status(port, "/hello.txt") == 200


@needs_curl
def test_ranges_single_suffix_open_ended_and_unsatisfiable(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """curl -r: 206 with Content-Range for a-b, -n and a-; 416 with bytes */size past the end."""
    port = start_web(run_tend, root)
    size = len(HELLO)
    for spec, expected, first, last in (
        ("2-5", HELLO[2:6], 2, 5),
        ("-4", HELLO[-4:], size - 4, size - 1),
        ("7-", HELLO[7:], 7, size - 1),
        ("10-999", HELLO[10:], 10, size - 1),
    ):
        headers, body = head_and_body(port, "/hello.txt", "-r", spec)
        assert headers["status"] == "206", spec
        assert headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert body == expected
    headers, _ = head_and_body(port, "/hello.txt", "-r", "100-200")
    assert headers["status"] == "416"
    assert headers["content-range"] == f"bytes */{size}"
    # A resumed download of the big file: the rest, after what is already there.
    partial = root.parent / "partial.bin"
    partial.write_bytes(BIG[:100_000])
    done = curl("-C", "-", "-o", str(partial), f"http://127.0.0.1:{port}/big.bin")
    assert done.returncode == 0, done.stderr
    assert partial.read_bytes() == BIG


@needs_curl
def test_several_ranges_come_as_multipart_and_a_flood_is_ignored(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """Two ranges: multipart/byteranges. Overlapping ones merge; more than 16: the whole file."""
    port = start_web(run_tend, root)
    headers, body = head_and_body(port, "/hello.txt", "-r", "0-1,4-5")
    assert headers["status"] == "206"
    boundary = headers["content-type"].removeprefix("multipart/byteranges; boundary=")
    assert body.count(f"--{boundary}".encode()) == 3
    assert b"content-range: bytes 0-1/16\r\n\r\nhe\r\n" in body
    assert b"content-range: bytes 4-5/16\r\n\r\no,\r\n" in body
    assert int(headers["content-length"]) == len(body)
    # Overlapping ranges of the big file merge into one: never more bytes than the file.
    headers, body = head_and_body(port, "/big.bin", "-r", ",".join(["0-"] * 16))
    assert headers["status"] == "206"
    assert body == BIG
    flood = ",".join(f"{n}-{n + 100}" for n in range(40))
    headers, body = head_and_body(port, "/big.bin", "-r", flood)
    assert headers["status"] == "200"
    assert body == BIG


@needs_curl
def test_if_range_sends_the_range_only_while_the_file_is_the_same(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """If-Range with the current ETag or date: 206; with another: the whole file, 200."""
    port = start_web(run_tend, root)
    headers, _ = head_and_body(port, "/hello.txt")
    for condition, expected in (
        (headers["etag"], "206"),
        (headers["last-modified"], "206"),
        ('"stale"', "200"),
        ("Mon, 01 Jan 2001 00:00:00 GMT", "200"),
    ):
        got, body = head_and_body(port, "/hello.txt", "-r", "0-4", "-H", f"If-Range: {condition}")
        assert got["status"] == expected, condition
        assert body == (HELLO[:5] if expected == "206" else HELLO)


def test_parse_ranges_merges_and_refuses() -> None:
    """The range parser: merged, sorted, never past the end; junk is ignored (None)."""
    assert parse_ranges("bytes=0-0,-1", 10) == [(0, 0), (9, 9)]
    assert parse_ranges("bytes=5-,0-6", 10) == [(0, 9)]
    assert parse_ranges("bytes=3-4,5-6", 10) == [(3, 6)]
    assert parse_ranges("bytes=20-", 10) == []
    assert parse_ranges("bytes=-0", 10) == []
    for junk in ("bytes=5-4", "items=0-1", "bytes=a-b", "bytes=-", "bytes=", "bytes 0-1"):
        assert parse_ranges(junk, 10) is None, junk
    assert parse_ranges("bytes=" + ",".join(["0-1"] * 17), 10) is None


# -- folders ------------------------------------------------------------------------------


@needs_curl
def test_folders_redirect_show_index_or_listing(run_tend: Callable[..., Tend], root: Path) -> None:
    """/sub redirects to /sub/ (path-only, even from //evil.com); index.html; else a listing."""
    port = start_web(run_tend, root)
    headers, _ = head_and_body(port, "/sub")
    assert headers["status"] == "301"
    assert headers["location"] == "/sub/"
    done = curl("--path-as-is", "-i", f"http://127.0.0.1:{port}//evil.com")
    assert b"\r\nlocation: /evil.com/\r\n" in done.stdout
    assert b"location: //" not in done.stdout
    assert curl(f"http://127.0.0.1:{port}/sub/").stdout == b"<h1>sub</h1>\n"
    headers, listing = head_and_body(port, "/docs/")
    assert headers["content-type"] == "text/html; charset=utf-8"
    page = listing.decode()
    assert '<a href="%3Cscript%3E.txt">&lt;script&gt;.txt</a>' in page
    assert "<script>" not in page
    assert "<img" not in page
    assert '<a href="a%20b%26c.txt">a b&amp;c.txt</a>' in page
    assert '<a href="../">' in page
    # Every link in the listing leads to the file.
    assert curl(f"http://127.0.0.1:{port}/docs/%3Cscript%3E.txt").stdout == b"angle brackets\n"


@needs_curl
def test_the_root_listing_hides_dotfiles_and_links_out(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """The listing shows files and folders, not .env, .git, nor links out or into a dotfile."""
    port = start_web(run_tend, root)
    page = curl(f"http://127.0.0.1:{port}/").stdout.decode()
    for shown in ("hello.txt", "big.bin", "sub/", "docs/", "alias.txt"):
        assert f">{shown}</a>" in page
    for hidden in (".env", ".git", "escape.txt", "escape_dir", "public"):
        assert hidden not in page


@needs_curl
def test_no_listing_gives_403(run_tend: Callable[..., Tend], root: Path) -> None:
    """--no-listing: a folder without an index file is 403; one with an index still serves it."""
    port = start_web(run_tend, root, "--no-listing")
    assert status(port, "/docs/") == 403
    assert status(port, "/") == 403
    assert status(port, "/sub/") == 200


# -- what is refused ----------------------------------------------------------------------

TRAVERSALS = [
    "/../outside/secret.txt",
    "/sub/../../outside/secret.txt",
    "/%2e%2e/outside/secret.txt",
    "/%2E%2E/%2e%2e/outside/secret.txt",
    "/sub/..%2f..%2foutside/secret.txt",
    "/sub%2f..%2f..%2foutside/secret.txt",
    "/..%5c..%5coutside/secret.txt",
    "/sub\\..\\..\\outside\\secret.txt",
    "/hello.txt%00.png",
    "/%00",
    "/./hello.txt",
    "/hello.txt%",
    "/%zz",
    "/escape.txt",
    "/escape_dir/secret.txt",
    "/escape_dir/",
    "/.env",
    "/.git/config",
    "/public/config",
    "/%2eenv",
    "/fifo",
    "/loop",
]


@needs_curl
def test_traversal_symlinks_and_dotfiles_are_refused(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """curl --path-as-is: dot-dot (encoded too), encoded slashes, backslashes, NUL, links out
    of the root and dotfiles: 400 or 404, and the secret never shows."""
    port = start_web(run_tend, root)
    for path in TRAVERSALS:
        done = curl("--path-as-is", "-i", f"http://127.0.0.1:{port}{path}")
        assert done.returncode == 0, (path, done.stderr)
        code = int(done.stdout.split(b" ", 2)[1])
        assert code in (400, 404), (path, code)
        assert SECRET not in done.stdout, path


@needs_curl
def test_follow_symlinks_and_show_dotfiles_are_explicit(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """--follow-symlinks serves a link out of the root; --show-dotfiles serves .env; .. never."""
    port = start_web(run_tend, root, "--follow-symlinks", "--show-dotfiles")
    assert curl(f"http://127.0.0.1:{port}/escape.txt").stdout == SECRET
    assert curl(f"http://127.0.0.1:{port}/.env").stdout == b"PASSWORD=" + SECRET
    assert status(port, "/../outside/secret.txt") == 400
    assert status(port, "/%2e%2e/outside/secret.txt") == 400


# -- real clients over whole sessions ------------------------------------------------------


@needs_wget
def test_wget_mirrors_the_tree_byte_for_byte(
    run_tend: Callable[..., Tend], root: Path, tmp_path: Path
) -> None:
    """wget -r fetches every file the listing shows, each identical; nothing from outside."""
    port = start_web(run_tend, root)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    assert WGET is not None
    done = subprocess.run(
        [WGET, "-q", "-r", "-np", "-nH", "-e", "robots=off", f"http://127.0.0.1:{port}/"],
        cwd=mirror,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = {
        "hello.txt": HELLO,
        "big.bin": BIG,
        "alias.txt": HELLO,
        "empty.txt": b"",
        "sub/index.html": b"<h1>sub</h1>\n",
        "docs/a b&c.txt": b"spaces and an ampersand\n",
        "docs/<script>.txt": b"angle brackets\n",
        f"docs/{NASTY}": b"an attribute\n",
    }
    for name, content in expected.items():
        assert (mirror / name).read_bytes() == content, name
    fetched = {path.relative_to(mirror).as_posix() for path in mirror.rglob("*") if path.is_file()}
    assert not {name for name in fetched if "secret" in name or "escape" in name or "/." in name}
    for path in mirror.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_bytes(), path


def test_http_client_keeps_the_connection_alive(run_tend: Callable[..., Tend], root: Path) -> None:
    """http.client sends three requests over one connection (the same local port)."""
    port = start_web(run_tend, root)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        bodies = []
        local_ports = set()
        for path in ("/hello.txt", "/big.bin", "/sub/deeper/note.txt"):
            connection.request("GET", path)
            response = connection.getresponse()
            bodies.append(response.read())
            assert connection.sock is not None
            local_ports.add(connection.sock.getsockname()[1])
        assert bodies == [HELLO, BIG, b"a note, deeper down\n"]
        assert len(local_ports) == 1
    finally:
        connection.close()


def test_pipelined_requests_are_answered_in_order(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """Three requests written at once: three answers in order; Connection: close ends it."""
    port = start_web(run_tend, root)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /sub/deeper/note.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"  # after the close: never answered
        )
        data = read_all(sock)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    hello = data.index(HELLO)
    head = data.index(f"content-length: {len(BIG)}".encode())
    note = data.index(b"a note, deeper down\n")
    assert hello < head < note
    assert data.endswith(b"a note, deeper down\n")
    assert data.lower().count(b"connection: close") == 1


def test_a_half_closed_client_gets_its_answer_and_absolute_targets_stay_inside(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """A client that ends its side after asking (nc -N) still gets the answer; a target in
    absolute form (http://host/path) is held to the same rules."""
    port = start_web(run_tend, root)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET http://example.com/hello.txt HTTP/1.1\r\nHost: example.com\r\n\r\n"
            b"GET http://example.com/../outside/secret.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        sock.shutdown(socket.SHUT_WR)
        data = read_all(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert HELLO in data
    assert b"HTTP/1.1 400 Bad Request\r\n" in data
    assert SECRET not in data


# -- limits ----------------------------------------------------------------------------------


@needs_curl
def test_header_and_request_line_caps(run_tend: Callable[..., Tend], root: Path) -> None:
    """A head over --max-header-bytes gets 431; a long target under it still works or 414."""
    port = start_web(run_tend, root, "--max-header-bytes", "2048")
    assert status(port, "/hello.txt", "-H", "X-Big: " + "a" * 4000) == 431
    assert status(port, "/" + "a" * 4000) == 431
    assert status(port, "/hello.txt", "-H", "X-Small: " + "a" * 500) == 200


def test_a_slow_head_gets_408_and_a_silent_client_is_closed(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """--header-timeout: a head that never ends gets 408 and the end; silence just the end."""
    port = start_web(run_tend, root, "--header-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert read_all(sock) == b""


def test_an_idle_keep_alive_connection_is_closed(run_tend: Callable[..., Tend], root: Path) -> None:
    """--idle-timeout: after an answer, a connection with nothing more to ask is closed."""
    port = start_web(run_tend, root, "--idle-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(sock).endswith(HELLO)


@needs_curl
def test_connections_beyond_the_cap_get_503(run_tend: Callable[..., Tend], root: Path) -> None:
    """--max-connections 1: while one client holds a connection, the next is told 503."""
    port = start_web(run_tend, root, "--max-connections", "1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as holder:
        holder.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert holder.recv(65536).startswith(b"HTTP/1.1 200")
        headers, _ = head_and_body(port, "/hello.txt")
        assert headers["status"] == "503"
        assert headers["retry-after"] == "1"
    wait_until(lambda: status(port, "/hello.txt") == 200)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_client_that_never_reads_is_cut_off(
    run_tend: Callable[..., Tend], root: Path, loop: str
) -> None:
    """A client that asks for a large file and reads nothing is reset after the idle timeout,
    whether the body goes by sendfile (asyncio) or by reads and writes (uvloop)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    (root / "huge.bin").write_bytes(b"x" * (64 * 1024 * 1024))
    tend = run_tend(
        *FOREGROUND, "--loop", loop, "web", "--path", str(root), *LOCAL, "--idle-timeout", "0.5"
    )
    port = tend.wait_for_port()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        tend.wait_for_output(r'"GET /huge\.bin HTTP/1\.1" 200 ')
        with pytest.raises(ConnectionResetError):
            read_all(sock)


def test_a_body_on_a_get_is_read_and_a_large_one_refused(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """A small body on GET is dropped and keep-alive goes on; one over 64 KiB gets 413."""
    port = start_web(run_tend, root)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert read_all(sock).count(HELLO) == 2
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100_000
        )
        assert read_all(sock).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")


def test_garbage_gets_400_and_the_end(run_tend: Callable[..., Tend], root: Path) -> None:
    """Something that is not HTTP gets 400 and the connection closes, even half-closed."""
    port = start_web(run_tend, root)
    for half_close in (False, True):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            assert read_all(sock).startswith(b"HTTP/1.1 400 ")


# -- the log, the stop, TLS ------------------------------------------------------------


@needs_curl
def test_each_request_is_logged_in_the_common_log_format(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """One line per request: client, date, request line, status, bytes, then seconds."""
    tend = run_tend(*FOREGROUND, "web", "--path", str(root), *LOCAL)
    port = tend.wait_for_port()
    curl(f"http://127.0.0.1:{port}/hello.txt")
    curl("--path-as-is", f'http://127.0.0.1:{port}/"quoted"%0d%0a')
    line = tend.wait_for_output(
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET /hello\.txt HTTP/1\.1" 200 16 \d+\.\d{4}$'
    )
    assert line
    tend.wait_for_output(r'"GET /\\x22quoted\\x22%0d%0a HTTP/1\.1" 404 14 ')


def test_stopping_closes_idle_connections_at_once(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """A stop closes an idle keep-alive connection without waiting for the grace period."""
    tend = run_tend(*FOREGROUND, "web", "--path", str(root), *LOCAL)
    port = tend.wait_for_port()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(HELLO):
            answer += sock.recv(65536)
        assert tend.stop() == 0
        assert sock.recv(65536) == b""
    assert "aborted" not in tend.stdout
    assert "Traceback" not in tend.stdout + tend.stderr


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serves_over_tls(
    run_tend: Callable[..., Tend], root: Path, tmp_path: Path, loop: str
) -> None:
    """Over a tls: endpoint (no zero-copy there) files still arrive whole."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    from test_tls import OPENSSL, client_context, make_certificate

    if OPENSSL is None:
        pytest.skip("needs the openssl command")
    certificate = make_certificate(tmp_path, "web")
    tend = run_tend(
        *FOREGROUND, "--loop", loop, "web", "--path", str(root),
        "--listen", f"tls:0:interface=127.0.0.1:certKey={certificate.cert}"
        f":privateKey={certificate.key}",
    )  # fmt: skip
    port = tend.wait_for_port()
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=10, context=client_context(certificate)
    )
    try:
        for path, expected in (("/big.bin", BIG), ("/hello.txt", HELLO)):
            connection.request("GET", path)
            assert connection.getresponse().read() == expected
        connection.request("GET", "/big.bin", headers={"Range": "bytes=1000-"})
        assert connection.getresponse().read() == BIG[1000:]
    finally:
        connection.close()


@needs_curl
def test_listens_on_every_listen_given(
    run_tend: Callable[..., Tend], root: Path, tmp_path: Path
) -> None:
    """--listen twice, TCP and a UNIX socket: both serve the one folder."""
    socket_path = tmp_path / "web.sock"
    tend = run_tend(
        *FOREGROUND, "web", "--path", str(root), *LOCAL, "--listen", f"unix:{socket_path}"
    )
    port = tend.wait_for_port()
    tend.wait_for_output(r"starting on .*web\.sock")
    assert curl(f"http://127.0.0.1:{port}/hello.txt").stdout == HELLO
    assert curl("--unix-socket", str(socket_path), "http://localhost/hello.txt").stdout == HELLO
    assert "other hosts can reach" not in tend.stdout


def test_a_listener_off_loopback_is_warned_of(run_tend: Callable[..., Tend], root: Path) -> None:
    """One warning line when a listener is not on loopback (all interfaces here)."""
    tend = run_tend(*FOREGROUND, "web", "--path", str(root), "--listen", "0", "--iface", "0.0.0.0")
    port = tend.wait_for_port()
    warnings = re.findall(r"^.*other hosts can reach.*$", tend.stdout, re.MULTILINE)
    assert len(warnings) == 1
    assert f"listening on 0.0.0.0:{port}, which other hosts can reach: anyone" in warnings[0]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/hello.txt")
    assert connection.getresponse().read() == HELLO
    connection.close()


def test_runs_from_a_deployment_file(
    run_tend: Callable[..., Tend], root: Path, tmp_path: Path
) -> None:
    """A [[service]] entry with plugin = "web" takes the same options, relative paths included,
    and an array of listen endpoints as --listen given twice."""
    socket_path = tmp_path / "site.sock"
    deployment = tmp_path / "site.toml"
    deployment.write_text(
        "[[service]]\n"
        'plugin = "web"\n'
        'name = "site"\n'
        'path = "root"\n'
        f'listen = ["tcp:0:interface=127.0.0.1", "unix:{socket_path}"]\n'
        "no-listing = true\n"
        "idle-timeout = 5\n"
    )
    tend = run_tend(*FOREGROUND, "-c", str(deployment))
    port = tend.wait_for_port()
    assert status(port, "/") == 403
    assert curl(f"http://127.0.0.1:{port}/hello.txt").stdout == HELLO
    over_unix = curl("--unix-socket", str(socket_path), "http://localhost/hello.txt")
    assert over_unix.stdout == HELLO


# -- mistakes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "tcp:abc"], "argument --listen: invalid endpoint"),
        (["--max-connections", "0"], "argument --max-connections: invalid connection count"),
        (["--idle-timeout", "-1"], "argument --idle-timeout: invalid duration"),
        (["--max-header-bytes", "10"], "argument --max-header-bytes: invalid header size"),
        (["--index", "a/b"], "argument --index: invalid index file name"),
        (["--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    run_tend: Callable[..., Tend], arguments: list[str], message: str
) -> None:
    """Each bad option is named in one line (and tend's hint), exit 2, nothing started."""
    tend = run_tend(*FOREGROUND, "web", *arguments)
    assert tend.wait() == 2
    assert_usage_error(tend.stderr, "web", message)


def test_a_missing_folder_is_one_line_and_exit_1(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    """--path naming no folder: one line naming it, exit 1."""
    tend = run_tend(*FOREGROUND, "web", "--path", str(tmp_path / "missing"), *LOCAL)
    assert tend.wait() == 1
    assert tend.stderr.splitlines() == [
        f"tend: cannot serve folder '{tmp_path / 'missing'}': No such file or directory"
    ]


def test_without_h11_it_says_what_to_install(
    run_tend: Callable[..., Tend], root: Path, tmp_path: Path
) -> None:
    """With h11 missing, tend web is one line: pip install 'tend[web]' (exit 1)."""
    blocker = tmp_path / "no_h11"
    blocker.mkdir()
    (blocker / "h11.py").write_text("raise ModuleNotFoundError(\"No module named 'h11'\")\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    tend = run_tend(*FOREGROUND, "web", "--path", str(root), *LOCAL, env=env)
    assert tend.wait() == 1
    assert tend.stderr.splitlines() == ["tend: tend web needs h11: pip install 'tend[web]'"]
    assert run_tend("web", "--help", env=env).wait() == 0


@needs_curl
def test_a_systemd_socket_off_loopback_is_warned_of_once(root: Path, tmp_path: Path) -> None:
    """A socket passed as systemd passes it (bound here on all interfaces) gets the same one
    warning as a --listen off loopback, from the supervisor, not once per worker: what is
    bound counts, not how it was described."""
    with socket.socket() as passed:
        passed.bind(("0.0.0.0", 0))
        passed.listen()
        port = passed.getsockname()[1]
        web = [*TEND, *FOREGROUND, "--workers", "2", "web", "--path", str(root),
               "--listen", "systemd:index=0"]  # fmt: skip
        command = [sys.executable, "-c", PASS_SOCKET, str(passed.fileno()), *web]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        server = Spawned(command, tmp_path, environment, pass_fds=(passed.fileno(),))
    try:
        wait_until(lambda: server.stdout.count("serving folder") == 2)
        assert curl(f"http://127.0.0.1:{port}/hello.txt").stdout == HELLO
        warnings = re.findall(r"^.*other hosts can reach.*$", server.stdout, re.MULTILINE)
        assert len(warnings) == 1, server.output
        assert (
            f"[tend.builtins.web] listening on 0.0.0.0:{port}, which other hosts can "
            "reach: anyone who can reach it can read" in warnings[0]
        )
    finally:
        server.kill()
