"""tend ftp with real clients: curl, wget, lftp and ftplib, and the attacks twistd's fails."""

from __future__ import annotations

import contextlib
import ftplib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Spawned, Tend, assert_usage_error, wait_until

FOREGROUND = ["--nodaemon", "--pidfile", ""]
LOCAL = ["--listen", "tcp:0:interface=127.0.0.1"]
MIB = 1024 * 1024
HELLO = b"hello world\n"
SECRET = b"TOP SECRET outside the root\n"
# A name that would forge a reply if it reached the control connection as it is.
FORGED = "evil\r\n226 forged"


def needs(program: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(program) is None, reason=f"needs {program} (make test installs it)"
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tree to serve, with links out of it and a name holding CR and LF."""
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB and a bit
    (root / "sub" / "nested.txt").write_bytes(b"nested\n")
    (root / "sub" / "deeper" / "deep.txt").write_bytes(b"deep\n" * 1000)
    (root / "with space.txt").write_bytes(b"spaced\n")
    (root / "inner_link.txt").symlink_to("hello.txt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (root / "escape_link.txt").symlink_to("../outside/secret.txt")
    (root / "escape_dir").symlink_to(outside)
    (root / FORGED).write_bytes(b"forged\n")
    return root


SERVED = {
    "hello.txt": HELLO,
    "big.bin": bytes(range(256)) * 4096 + b"tail",
    "sub/nested.txt": b"nested\n",
    "sub/deeper/deep.txt": b"deep\n" * 1000,
    "with space.txt": b"spaced\n",
    "inner_link.txt": HELLO,
}


def start(run_tend: Callable[..., Tend], root: Path, *extra: str) -> tuple[Tend, int]:
    """Run `tend ftp` on a free loopback port; return it and the port."""
    tend = run_tend(*FOREGROUND, "ftp", *LOCAL, "--root", str(root), *extra)
    return tend, tend.wait_for_port()


@pytest.fixture
def server(run_tend: Callable[..., Tend], root: Path) -> tuple[Tend, int]:
    return start(run_tend, root)


def run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, timeout=60, check=False, cwd=cwd)


def login(port: int, host: str = "127.0.0.1", password: str = "") -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(host, port)
    ftp.login("anonymous", password)
    return ftp


def received(sock: socket.socket) -> bytes:
    """Everything *sock* receives until its end; a reset ends it too."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def passive_port(ftp: ftplib.FTP) -> int:
    match = re.search(r"\|\|\|(\d+)\|", ftp.sendcmd("EPSV"))
    assert match is not None
    return int(match.group(1))


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def logged(tend: Tend, pattern: str) -> re.Match[str]:
    """Wait for a log line (tend writes its log in bursts)."""
    return tend.wait_for_output(pattern)


# -- real clients ----------------------------------------------------------------------------


@needs("curl")
def test_curl_lists_with_list_and_with_a_bare_nlst(server: tuple[Tend, int]) -> None:
    """curl's folder listing (LIST) and `-l` (a bare NLST, which twistd refuses) both work."""
    _, port = server
    listing = run("curl", "-sS", f"ftp://127.0.0.1:{port}/")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert any(line.startswith("-r--r--r--") and line.endswith(" hello.txt") for line in lines)
    assert any(line.startswith("dr-xr-xr-x") and line.endswith(" sub") for line in lines)
    names = run("curl", "-sS", "-l", f"ftp://127.0.0.1:{port}/")
    assert names.returncode == 0, names.stderr
    assert names.stdout.decode().splitlines() == [
        "big.bin",
        "hello.txt",
        "inner_link.txt",
        "sub",
        "with space.txt",
    ]


@needs("curl")
def test_curl_range_resume_and_head(server: tuple[Tend, int], tmp_path: Path) -> None:
    """`-r` and `-C -` use REST; `-I` uses MDTM and SIZE."""
    _, port = server
    url = f"ftp://127.0.0.1:{port}/big.bin"
    whole = SERVED["big.bin"]
    ranged = run("curl", "-sS", "-r", "1000-1999", url)
    assert ranged.returncode == 0, ranged.stderr
    assert ranged.stdout == whole[1000:2000]
    partial = tmp_path / "partial.bin"
    partial.write_bytes(whole[:300_000])
    resumed = run("curl", "-sS", "-C", "-", "-o", str(partial), url)
    assert resumed.returncode == 0, resumed.stderr
    assert partial.read_bytes() == whole
    head = run("curl", "-sS", "-I", url)
    assert head.returncode == 0, head.stderr
    assert f"Content-Length: {len(whole)}" in head.stdout.decode()
    assert "Last-Modified: " in head.stdout.decode()


@needs("curl")
def test_curl_active_mode_is_refused_by_default(server: tuple[Tend, int]) -> None:
    """`curl -P -` (EPRT, then PORT) fails: no active mode unless --allow-active."""
    _, port = server
    result = run("curl", "-sS", "-P", "-", f"ftp://127.0.0.1:{port}/hello.txt")
    assert result.returncode == 30, result  # "FTP PORT failed"
    assert result.stdout == b""


@needs("curl")
def test_curl_active_mode_to_itself_with_allow_active(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """With --allow-active, PORT and EPRT to the client's own address work."""
    _, port = start(run_tend, root, "--allow-active")
    for extra in ([], ["--disable-eprt"]):
        result = run("curl", "-sS", "-P", "127.0.0.1", *extra, f"ftp://127.0.0.1:{port}/hello.txt")
        assert result.returncode == 0, result.stderr
        assert result.stdout == HELLO


@needs("wget")
def test_wget_mirrors_the_tree_byte_for_byte(server: tuple[Tend, int], tmp_path: Path) -> None:
    """`wget -r` gets every file, identical; the links out and the forged name are absent."""
    _, port = server
    mirror = tmp_path / "wget"
    mirror.mkdir()
    result = run("wget", "-q", "-r", "-nH", f"ftp://127.0.0.1:{port}/", cwd=mirror)
    assert result.returncode == 0, result.stderr
    assert files_under(mirror) == SERVED


@needs("lftp")
def test_lftp_mirror_uses_mlsd(server: tuple[Tend, int], tmp_path: Path) -> None:
    """lftp's `mirror` lists with MLSD and copies the tree exactly."""
    tend, port = server
    mirror = tmp_path / "lftp"
    script = f"set net:max-retries 1; set net:timeout 10; mirror / {mirror}; quit"
    result = run("lftp", "-e", script, f"ftp://127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    assert files_under(mirror) == SERVED
    logged(tend, r"MLSD '/sub/deeper' \d+ bytes")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ftplib_mlsd_size_and_a_resumed_retrbinary(
    run_tend: Callable[..., Tend], root: Path, loop: str
) -> None:
    """ftplib's mlsd(), size() and retrbinary(rest=), on either event loop."""
    pytest.importorskip(loop)
    tend = run_tend("--loop", loop, *FOREGROUND, "ftp", *LOCAL, "--root", str(root))
    with login(tend.wait_for_port()) as ftp:
        facts = dict(ftp.mlsd())
        assert set(facts) == {"big.bin", "hello.txt", "inner_link.txt", "sub", "with space.txt"}
        assert facts["big.bin"]["type"] == "file"
        assert facts["big.bin"]["size"] == str(len(SERVED["big.bin"]))
        assert facts["sub"]["type"] == "dir"
        assert re.fullmatch(r"\d{14}", facts["hello.txt"]["modify"])
        assert ftp.size("big.bin") == len(SERVED["big.bin"])
        got = io.BytesIO()
        ftp.retrbinary("RETR big.bin", got.write, rest=12345)
        assert got.getvalue() == SERVED["big.bin"][12345:]
        got = io.BytesIO()
        ftp.retrbinary("RETR with space.txt", got.write)
        assert got.getvalue() == b"spaced\n"
        ftp.cwd("sub/deeper")
        assert ftp.pwd() == "/sub/deeper"
        assert ftp.nlst() == ["deep.txt"]
        ftp.sendcmd("CDUP")
        assert ftp.pwd() == "/sub"


def test_mlst_mdtm_feat_and_opts(server: tuple[Tend, int]) -> None:
    """The single-line commands lftp and curl rely on answer as RFC 2389/3659 say."""
    _, port = server
    with login(port) as ftp:
        features = ftp.sendcmd("FEAT").splitlines()
        for feature in ("EPSV", "MDTM", "REST STREAM", "SIZE", "UTF8"):
            assert f" {feature}" in features
        assert " MLST type*;size*;modify*;perm*;" in features
        assert ftp.sendcmd("OPTS UTF8 ON").startswith("200")
        assert ftp.sendcmd("OPTS MLST type;size;") == "200 MLST OPTS type;size;"
        assert ftp.sendcmd("MLST /sub/nested.txt").splitlines() == [
            "250-Listing /sub/nested.txt",
            " type=file;size=7; /sub/nested.txt",
            "250 End.",
        ]
        assert re.fullmatch(r"213 \d{14}", ftp.sendcmd("MDTM hello.txt"))
        assert ftp.sendcmd("SYST") == "215 UNIX Type: L8"
        assert ftp.sendcmd("TYPE A") == "200 Type set to A."
        assert ftp.sendcmd("MODE S").startswith("200")
        assert ftp.sendcmd("STRU F").startswith("200")
        assert ftp.sendcmd("NOOP").startswith("200")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.size("sub")


def test_abor_stops_a_transfer_and_the_session_goes_on(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """ABOR, sent urgently as ftplib does, answers 426 for the transfer, then 226."""
    with open(root / "huge.bin", "wb") as huge:
        huge.truncate(256 * MIB)  # more than the kernel buffers, so the transfer is still on
    tend, port = start(run_tend, root)
    with login(port) as ftp:
        ftp.voidcmd("TYPE I")
        with ftp.transfercmd("RETR huge.bin") as data:
            assert len(data.recv(65536)) > 0
            assert ftp.abort().startswith("426")
        assert ftp.getresp().startswith("226")
        assert ftp.sendcmd("NOOP").startswith("200")
    logged(tend, r"RETR '/huge.bin' \d+ bytes [\d.]+ s 426")


# -- what twistd gets wrong -------------------------------------------------------------------


def test_a_third_socket_racing_for_the_passive_port_gets_nothing(
    server: tuple[Tend, int],
) -> None:
    """Another address connecting to the passive port, before the client does or while the
    server waits for it, is reset and gets nothing; the client still gets the file."""
    tend, port = server
    with login(port) as ftp:
        data_port = passive_port(ftp)
        with socket.socket() as early:
            early.bind(("127.0.0.2", 0))
            early.settimeout(10)
            early.connect(("127.0.0.1", data_port))
            assert received(early) == b""
        ftp.putcmd("RETR hello.txt")
        with socket.socket() as late:
            late.bind(("127.0.0.2", 0))
            late.settimeout(10)
            late.connect(("127.0.0.1", data_port))
            assert received(late) == b""
        with socket.create_connection(("127.0.0.1", data_port), timeout=10) as real:
            assert ftp.getresp().startswith("150")
            assert received(real) == HELLO
        assert ftp.voidresp().startswith("226")
        # Once: the port took its one connection and is closed.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", data_port), timeout=10).close()
    logged(tend, r"refused a data connection from 127\.0\.0\.2:\d+ to the passive port")
    logged(tend, r"refused 2 data connections in all to the passive port")


def test_a_passive_port_nobody_connects_to_closes_after_the_data_timeout(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    _, port = start(run_tend, root, "--data-timeout", "0.5")
    with login(port) as ftp:
        data_port = passive_port(ftp)
        with pytest.raises(ftplib.error_temp, match=r"^425 Cannot open the data connection"):
            ftp.sendcmd("RETR hello.txt")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", data_port), timeout=10).close()


def test_passive_port_listens_on_the_control_address_only(server: tuple[Tend, int]) -> None:
    """The passive port is bound to the control connection's local address, not 0.0.0.0."""
    _, port = server
    with login(port) as ftp:
        reply = ftp.sendcmd("PASV")
        assert reply.startswith("227 Entering Passive Mode (127,0,0,1,")
        numbers = [int(n) for n in re.findall(r"\d+", reply.partition("(")[2])]
        data_port = numbers[4] * 256 + numbers[5]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", data_port), timeout=10).close()


def test_port_and_eprt_elsewhere_or_below_1024_are_refused_even_when_allowed(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """With --allow-active, data still goes only to the client's address, ports >= 1024:
    no FTP bounce to another host or to port 25."""
    tend, port = start(run_tend, root, "--allow-active")
    with socket.socket() as target, login(port) as ftp:
        target.bind(("127.0.0.2", 0))
        target.listen()
        target.setblocking(False)
        high, low = divmod(target.getsockname()[1], 256)
        for command in (
            f"PORT 127,0,0,2,{high},{low}",
            f"EPRT |1|127.0.0.2|{target.getsockname()[1]}|",
            "PORT 127,0,0,1,0,25",
            "EPRT |1|127.0.0.1|25|",
            "EPRT |2|::1|2121|",
        ):
            with pytest.raises(ftplib.error_perm, match=r"^501"):
                ftp.sendcmd(command)
            with pytest.raises(ftplib.error_temp, match=r"^425"):
                ftp.sendcmd("RETR hello.txt")
        with pytest.raises(BlockingIOError):
            target.accept()
    logged(tend, r"refused PORT to 127\.0\.0\.1:25 from 127\.0\.0\.1:\d+: a privileged port")


def test_symlinks_out_of_the_root_are_refused_and_not_listed(server: tuple[Tend, int]) -> None:
    """A link leading out of the folder is neither served, entered nor listed (twistd
    serves both); a link inside it is."""
    tend, port = server
    with login(port) as ftp:
        for command in ("SIZE escape_link.txt", "MDTM escape_link.txt", "CWD escape_dir"):
            with pytest.raises(ftplib.error_perm, match=r"^550 .*outside the served folder"):
                ftp.sendcmd(command)
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.retrbinary("RETR escape_link.txt", lambda _: None)
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.retrlines("LIST escape_dir", lambda _: None)
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.retrbinary("RETR escape_dir/secret.txt", lambda _: None)
        lines: list[str] = []
        ftp.retrlines("LIST -la", lines.append)
        assert not any("escape" in line for line in lines)
        got = io.BytesIO()
        ftp.retrbinary("RETR inner_link.txt", got.write)
        assert got.getvalue() == HELLO
    logged(tend, r"127\.0\.0\.1:\d+ RETR 'escape_link.txt' 0 bytes 0.000 s 550")


@needs("curl")
def test_traversal_stays_in_the_root(server: tuple[Tend, int]) -> None:
    """`..` never climbs above the folder: it is the folder's own root."""
    _, port = server
    with login(port) as ftp:
        ftp.cwd("../../..")
        assert ftp.pwd() == "/"
        for path in ("../outside/secret.txt", "/../../outside/secret.txt", "sub/../../outside"):
            with pytest.raises(ftplib.error_perm, match=r"^550"):
                ftp.size(path)
    result = run("curl", "-sS", "--path-as-is", f"ftp://127.0.0.1:{port}/../outside/secret.txt")
    assert result.returncode != 0
    assert SECRET not in result.stdout


def test_a_name_with_cr_or_lf_never_splits_a_reply(server: tuple[Tend, int]) -> None:
    """A file whose name holds CR LF is left out of every listing; a CR in an argument is
    refused, so no name can forge a reply or a listing line."""
    _, port = server
    with login(port) as ftp:
        for command in ("NLST", "LIST", "MLSD"):
            lines: list[str] = []
            ftp.retrlines(command, lines.append)
            assert lines
            assert not any("evil" in line or "forged" in line for line in lines), command
        # ftplib will not send a CR inside a command; a raw client can.
        assert ftp.sock is not None
        ftp.sock.sendall(b"MLST evil\r226 forged\r\n")
        with pytest.raises(ftplib.error_perm, match=r"^501 "):
            ftp.getresp()
        # One command, one reply: the next command still gets its own.
        assert ftp.sendcmd("NOOP") == "200 NOOP ok."


def test_write_commands_answer_550(server: tuple[Tend, int], root: Path) -> None:
    """STOR, DELE and every other command that writes answer 550; nothing changes."""
    _, port = server
    before = files_under(root)
    with login(port) as ftp:
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.storbinary("STOR new.txt", io.BytesIO(b"x"))
        for command in (
            "DELE hello.txt",
            "MKD new",
            "RMD sub",
            "RNFR hello.txt",
            "RNTO moved.txt",
            "APPE hello.txt",
            "STOU",
            "SITE CHMOD 777 hello.txt",
        ):
            with pytest.raises(ftplib.error_perm, match=r"^550"):
                ftp.sendcmd(command)
    assert files_under(root) == before


# -- limits -------------------------------------------------------------------------------


def test_a_command_line_past_4_kib_ends_the_session(server: tuple[Tend, int]) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"USER " + b"a" * 5000 + b"\r\n")
        assert received(sock).startswith(b"500 Command line too long")


def test_login_and_idle_timeouts_close_the_connection(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """A client that never logs in, or stays silent, is told 421 and closed."""
    _, port = start(run_tend, root, "--login-timeout", "0.5", "--idle-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert received(sock).endswith(b"421 Login timeout: closing the control connection.\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"USER ftp\r\nPASS x\r\n")
        assert received(sock).endswith(b"421 Idle timeout: closing the control connection.\r\n")


def test_a_client_that_stops_reading_is_cut_after_the_data_timeout(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    with open(root / "huge.bin", "wb") as huge:
        huge.truncate(256 * MIB)
    tend, port = start(run_tend, root, "--data-timeout", "0.5")
    with login(port) as ftp:
        ftp.voidcmd("TYPE I")
        with ftp.transfercmd("RETR huge.bin"), pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.voidresp()
        assert ftp.sendcmd("NOOP").startswith("200")
    logged(tend, r"RETR '/huge.bin' \d+ bytes [\d.]+ s 426")


def test_connections_past_the_caps_get_421(run_tend: Callable[..., Tend], root: Path) -> None:
    """--max-clients-per-ip and --max-clients: the connection past either is told 421."""
    _, port = start(run_tend, root, "--max-clients", "2", "--max-clients-per-ip", "1")
    with login(port):
        with connect_from("127.0.0.1", port) as second:
            assert received(second).startswith(b"421 Too many connections from your address")
        with connect_from("127.0.0.2", port) as other:
            assert other.recv(1024).startswith(b"220 ")
            with connect_from("127.0.0.3", port) as third:
                assert received(third).startswith(b"421 Too many connections (2)")


@contextlib.contextmanager
def connect_from(source: str, port: int) -> Iterator[socket.socket]:
    """A raw control connection from the loopback address *source*."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        yield sock


def test_the_access_log_has_a_line_per_transfer_and_never_the_password(
    server: tuple[Tend, int],
) -> None:
    tend, port = server
    with login(port, password="hunter2@example.org") as ftp:
        ftp.retrbinary("RETR hello.txt", lambda _: None)
    line = logged(tend, r"127\.0\.0\.1:\d+ RETR '/hello.txt' 12 bytes [\d.]+ s 226")
    assert line
    assert "hunter2" not in tend.stdout + tend.stderr


def test_stop_tells_idle_sessions_421_and_exits(server: tuple[Tend, int]) -> None:
    tend, port = server
    with login(port) as ftp:
        tend.process.send_signal(signal.SIGTERM)
        with pytest.raises(ftplib.error_temp, match=r"^421 The server is shutting down"):
            ftp.getresp()
    assert tend.wait() == 0


def test_stop_lets_a_transfer_finish_then_says_421(
    run_tend: Callable[..., Tend], root: Path
) -> None:
    """A download under way when tend is stopped completes (within the drain), then 421."""
    with open(root / "huge.bin", "wb") as huge:
        huge.truncate(64 * MIB)
    tend, port = start(run_tend, root)
    with login(port) as ftp:
        ftp.voidcmd("TYPE I")
        with ftp.transfercmd("RETR huge.bin") as data:
            tend.process.send_signal(signal.SIGTERM)
            logged(tend, r"Closed\)")
            assert len(received(data)) == 64 * MIB
        assert ftp.voidresp().startswith("226")
        with pytest.raises(ftplib.error_temp, match=r"^421 The server is shutting down"):
            ftp.getresp()
    assert tend.wait() == 0


# -- options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "unix:/tmp/ftp.sock"], "FTP needs TCP"),
        (["--listen", "tls:2121:certKey=x.pem"], "FTP needs TCP"),
        (["--listen", "tcp:abc"], "port must be a number"),
        (["--passive-ports", "3000-2000"], "invalid port range '3000-2000'"),
        (["--passive-ports", "80-90"], "invalid port range"),
        (["--max-clients", "0"], "invalid number '0'"),
        (["--data-timeout", "-1"], "invalid duration '-1'"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(
    run_tend: Callable[..., Tend], arguments: list[str], message: str
) -> None:
    tend = run_tend(*FOREGROUND, "ftp", *arguments)
    assert tend.wait() == 2
    assert_usage_error(tend.stderr, "ftp", message)


def test_a_missing_root_is_one_line_and_exit_1(
    run_tend: Callable[..., Tend], tmp_path: Path
) -> None:
    tend = run_tend(*FOREGROUND, "ftp", *LOCAL, "--root", str(tmp_path / "missing"))
    assert tend.wait() == 1
    assert tend.stderr.splitlines() == [
        f"tend: cannot serve folder '{tmp_path / 'missing'}': No such file or directory"
    ]


def test_listen_is_repeatable(run_tend: Callable[..., Tend], root: Path) -> None:
    tend = run_tend(
        *FOREGROUND,
        "ftp",
        *LOCAL,
        "--listen",
        "tcp:0:interface=127.0.0.2",
        "--root",
        str(root),
    )
    ports = wait_until(lambda: [int(p) for p in re.findall(r"starting on (\d+)", tend.stdout)][1:])
    first = int(re.findall(r"starting on (\d+)", tend.stdout)[0])
    for host, port in (("127.0.0.1", first), ("127.0.0.2", ports[0])):
        with login(port, host=host) as ftp:
            assert "hello.txt" in ftp.nlst()


def test_a_deployment_file_runs_it(run_tend: Callable[..., Tend], root: Path) -> None:
    deployment = root.parent / "deploy.toml"
    deployment.write_text(
        '[[service]]\nplugin = "ftp"\nlisten = "tcp:0:interface=127.0.0.1"\nroot = "root"\n'
    )
    tend = run_tend(*FOREGROUND, "-c", str(deployment))
    with login(tend.wait_for_port()) as ftp:
        assert "hello.txt" in ftp.nlst()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare for a network namespace of its own",
)
def test_warns_when_listening_beyond_loopback(tmp_path: Path, root: Path) -> None:
    """On 0.0.0.0, in a network namespace with no way out, one warning line says so."""
    command = [
        "unshare",
        "-n",
        sys.executable,
        "-m",
        "tend",
        *FOREGROUND,
        "ftp",
        "--listen",
        "tcp:0:interface=0.0.0.0",
        "--root",
        str(root),
    ]
    process = Spawned(command, tmp_path, {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        process.wait_for_output(r"starting on \d+")
        process.wait_for_output(
            r"listening on 0\.0\.0\.0:\d+, which other hosts can reach: anyone who can reach "
            r"it can read the folder, in clear text"
        )
        assert len(re.findall("other hosts can reach", process.stdout)) == 1
    finally:
        process.kill()


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6")
def test_epsv_over_ipv6(run_tend: Callable[..., Tend], root: Path) -> None:
    """Over ::1, ftplib uses EPSV; PASV is refused, as it cannot name an IPv6 address."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("needs an IPv6 loopback")
    tend = run_tend(*FOREGROUND, "ftp", "--listen", "tcp:0:interface=\\:\\:1", "--root", str(root))
    with login(tend.wait_for_port(), host="::1") as ftp:
        assert "hello.txt" in ftp.nlst()
        with pytest.raises(ftplib.error_temp, match=r"^425"):
            ftp.sendcmd("PASV")
