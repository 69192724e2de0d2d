"""The enumerated bad inputs: each a small record of a command, what to set up, and the status owed.

Kinds: runner options, plugin options, endpoints, deployment files, app files, pidfiles, log
paths, poems, certificates, odd paths, tendctl and get-poetry arguments, and the poetry
proxy's. Statuses follow the manual: 2 for a command-line mistake, 1 for a failed start
(a deployment file, app file, pidfile, log, poem or certificate that cannot be used);
where the manual does not say which, both are allowed. Most runs are in the foreground
(``--nodaemon``) in the case's folder, so that the default pidfile lands there and must be
gone afterwards; some repeat detached, where a launcher waits for a daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torture.harness import Case, Put, device, fifo, file, folder, link, socket_file

USAGE = 2
START = 1
EITHER = (1, 2)

LOCAL = "tcp:0:interface=127.0.0.1"  # where a case that wrongly starts listens
SERVE = ("poetry", "--port", LOCAL)
LONG = "x" * 5000
HUGE = "9" * 20
ARABIC_ONE = "\u0661"
SUPERSCRIPT_TWO = "\u00b2"
NEWLINE_NAME = "a\nb"
UNDECODABLE = "b\udcffd"  # the byte 0xFF, through surrogateescape

# A service a deployment file needs so that the error comes from what is tested.
SERVICE = f'\n[[service]]\nplugin = "poetry"\nport = "{LOCAL}"\n'


def _nd(*args: str) -> tuple[str, ...]:
    return ("--nodaemon", *args)


# -- runner options --------------------------------------------------------------------------

_RUNNER_BAD: dict[str, list[str]] = {
    "--log-max-bytes": ["-1", "abc", "1e3", "", " 5", ARABIC_ONE, "0x10", "1_000", "1.5", "+5"],
    "--log-backups": ["-1", "abc", "", ARABIC_ONE, "2.0", "+1", "0x2"],
    "--log-format": ["xml", "", "TEXT", "json "],
    "--log-level": ["verbose", "", "INFO", "5", "warn", "notset"],
    "--umask": [
        "8",
        "1000",
        "-1",
        "abc",
        "",
        "0x1f",
        " 22",
        "\u0660\u0662\u0662",
        "0o22",
        "777777",
    ],
    "--loop": ["trio", "", "UVLOOP", "asyncio2"],
    "--shutdown-timeout": [
        "-1",
        "nan",
        "inf",
        "-inf",
        "1e309",
        "86401",
        "",
        "abc",
        "0x10",
        ARABIC_ONE,
        "1_0",
        " 5",
    ],
    "--workers": ["0", "-1", "1000000", "auto2", "", "1.5", "\u0662", HUGE, "+2", " 2"],
}

_RUNNER_FILES = (file("plain", "plain\n"), fifo("pipe"))


def runner_options() -> Iterator[Case]:
    for option, values in _RUNNER_BAD.items():
        for value in values:
            yield Case(
                "runner-option",
                f"{option} {value!r}"[:60],
                _nd(option, value, *SERVE),
                USAGE,
                expect=option.lstrip("-"),
            )
    for option, value, status in [
        ("--pidfile", "-", USAGE),
        ("--pidfile", "@CASE@/missing/tend.pid", START),
        ("--pidfile", LONG, START),
        ("--pidfile", "/" + "y" * 300, START),
        ("-d", "@CASE@/missing", START),
        ("-d", "@CASE@/plain", START),
        ("-d", "@CASE@/pipe", START),
        ("-d", "/dev/null", START),
        ("-d", LONG, START),
    ]:
        yield Case(
            "runner-option",
            f"{option} {value[:40]!r}",
            _nd(option, value, *SERVE),
            status,
            expect=None if "pidfile" not in option else "pidfile",
            files=_RUNNER_FILES,
        )
    for value in ["", "/dev/log-missing", "host:0", "host:99999", "[::1", "::1:514", ":514", "x:"]:
        yield Case(
            "runner-option",
            f"--syslog-address {value!r}",
            _nd("--syslog", "--syslog-address", value, *SERVE),
            EITHER,
            expect="syslog",
            offline=True,
        )
    for value in ["nosuch", "", "LOCAL9", "kern2", "user\n"]:
        yield Case(
            "runner-option",
            f"--syslog-facility {value!r}",
            _nd("--syslog", "--syslog-facility", value, *SERVE),
            EITHER,
            expect="facility",
        )
    for value in ["a\nb", "\x1b[31m", "x" * 1000, ""]:
        yield Case(
            "runner-option",
            f"--prefix {value[:20]!r}",
            _nd("--syslog", "--syslog-address", "@CASE@/no.sock", "--prefix", value, *SERVE),
            EITHER,
        )
    for args, expect in [
        (("--bogus", *SERVE), "--bogus"),
        (("--pidfile",), "--pidfile"),
        (("-y", "a.py", "-c", "b.toml"), "-c"),
        (("-y", "a.py", "poetry"), "poetry"),
        (("-c", "b.toml", "poetry"), "poetry"),
        (("petry",), "petry"),
        (("--workers",), "--workers"),
        (("--nodaemon=yes", *SERVE), "nodaemon"),
        (("-n", "-n", "--no-nodaemon", "--log-level"), "log-level"),
        (("\x1b[2J",), None),
        (("poetry\n",), None),
        (("-" * 3000,), None),
        (("x" * 3000,), None),
        (("--" + "x" * 300,), None),
    ]:
        yield Case(
            "runner-option",
            "args " + repr(args)[:50],
            _nd(*args) if "--nodaemon" not in args else args,
            USAGE,
            expect=expect,
        )


def identities() -> Iterator[Case]:
    """-u and -g: out-of-range, negative, non-ASCII and unknown ids (root only)."""
    for option in ("-u", "-g"):
        for value in [
            "4294967295",
            "4294967296",
            "-1",
            "99999999999999999999",
            ARABIC_ONE,
            "",
            "nosuch-torture",
            "0x10",
            " 0",
            "65534\n",
            "x" * 300,
        ]:
            yield Case(
                "identity",
                f"{option} {value[:20]!r}",
                _nd("--pidfile=", option, value, *SERVE),
                EITHER,
                root_only=True,
            )
    yield Case(
        "identity",
        "-u 123456 without a passwd entry or -g",
        _nd("--pidfile=", "-u", "123456", *SERVE),
        EITHER,
        expect="123456",
        root_only=True,
    )
    yield Case(
        "identity",
        "-g 123456 alone (root's groups kept)",
        _nd("--pidfile=", "-g", "123456", *SERVE),
        EITHER,
        root_only=True,
    )
    for value in ["@CASE@/missing", "@CASE@/plain", "", "@CASE@/pipe", "/" + "z" * 300]:
        yield Case(
            "identity",
            f"--chroot {value[:30]!r}",
            _nd("--chroot", value, *SERVE),
            EITHER,
            files=_RUNNER_FILES,
            root_only=True,
        )
    yield Case(
        "identity",
        "--chroot to a jail without the poem",
        _nd("--chroot", "@CASE@/jail", "-u", "nobody", "poetry", "--port", LOCAL, "--poem", "/p"),
        START,
        expect="poem",
        files=(folder("jail"),),
        root_only=True,
    )


# -- plugin options ---------------------------------------------------------------------------


def plugin_options() -> Iterator[Case]:
    for option, values in {
        "--chunk-size": ["0", "-1", "abc", "", ARABIC_ONE, "1.5", "0x10"],
        "--delay": ["-1", "nan", "inf", "86401", "abc", "", "1e309"],
        "--iface": ["a" * 64, "a" * 300, "999.1.1.1", "192.0.2.1", "\u202e", "a..b", "::1%nosuch"],
    }.items():
        for value in values:
            yield Case(
                "plugin-option",
                f"{option} {value[:30]!r}",
                _nd("poetry", "--port", "0", option, value),
                START if option == "--iface" else USAGE,
                expect=None if option == "--iface" else option.lstrip("-"),
                offline=option == "--iface",
            )
    for args, expect in [
        (("poetry", "--bogus"), "--bogus"),
        (("poetry", "--port"), "--port"),
        (("poetry", "-p"), "-p"),
        (("poetry", "extra"), "extra"),
        (("poetry", "--port", LOCAL, "--poem"), "--poem"),
        (("poetry-proxy", "--port", LOCAL), "--server"),
    ]:
        yield Case("plugin-option", " ".join(args)[:60], _nd(*args), USAGE, expect=expect)


# -- endpoints --------------------------------------------------------------------------------

_ENDPOINT_SYNTAX = [
    "a=b",
    "backlog=5",
    "",
    ":",
    "::",
    "tcp",
    "tcp:",
    "tcp:abc",
    "tcp:-1",
    "tcp:65536",
    "tcp:" + HUGE,
    "tcp:1:2",
    "tcp:port=1:2",
    "tcp:0:backlog=0",
    "tcp:0:backlog=-1",
    "tcp:0:backlog=abc",
    "tcp:0:backlog=2147483648",
    "tcp:0:backlog=" + HUGE,
    "tcp:0:reusePort=maybe",
    "tcp:0:bogus=1",
    "tcp:0:interface",
    "tcp:0:interface=::1",
    "tcp:0:=1",
    "tcp:0:backlog=1:backlog=2",
    "TCP:0:Interface=127.0.0.1",
    "tcp:\u0663",
    "\u0663",
    "1\u0663",
    "\\",
    "tcp:0\\",
    "tcp:1\\:2",
    "unix:",
    "unix:s.sock:mode=-1",
    "unix:s.sock:mode=77777777777",
    "unix:s.sock:mode=8",
    "unix:s.sock:mode=",
    "unix:s.sock:mode=10000",
    "unix:s.sock:extra",
    "unix:s.sock:backlog=0",
    "unix:s.sock:backlog=2147483648",
    "unix:s.sock:interface=x",
    "tls:0",
    "tls:abc:certKey=c.pem",
    "tls:0:certKey=",
    "tls:0:certKey=c.pem:bogus=1",
    "ssl:",
    "systemd:",
    "systemd:index=-1",
    "systemd:index=a",
    "systemd:index=0:name=x",
    "systemd:name=",
    "systemd:domain=FOO:index=0",
    "systemd:index=" + HUGE,
    "systemd:index=\u0661",
    "systemd:0",
    "foo:1",
    "http://127.0.0.1:1",
    "[::1]:10000",
    "127.0.0.1:10000",
    "tcp:0:interface=\\:\\:1:tcp:0",
    "tcp:0:interface=a\nb",
    "tcp:0:interface=\x1b[31m",
    "unix:\x00",
    "x" * 10000,
    "tcp:0:" + "k=v:" * 2000,
]

_ENDPOINT_START = [
    ("tcp:@BUSY@:interface=127.0.0.1", "in use"),
    ("tcp:0:interface=" + "a" * 64, None),
    ("tcp:0:interface=" + "a" * 300, None),
    ("tcp:0:interface=192.0.2.1", "192.0.2.1"),
    ("tcp:0:interface=[\\:\\:1]", None),
    ("tcp:0:interface=\\:\\:1%nosuchif", None),
    ("tcp:0:interface=\\:\\:ffff\\:999.1.1.1", None),
    ("tcp:0:interface=\u202e", None),
    ("tcp:0:interface=a..b", None),
    ("tcp:0:interface=-1", None),
    ("unix:@CASE@/missing/s.sock", "s.sock"),
    ("unix:@CASE@/" + "s" * 200, None),
    ("unix:@CASE@/plain", "plain"),
    ("unix:@CASE@/link-to-victim", None),
    ("unix:@CASE@/pipe", "pipe"),
    ("unix:/dev/null", None),
    ("unix:@CASE@/dir", None),
    ("systemd:index=0", "LISTEN_FDS"),
    ("systemd:name=poetry", "LISTEN_FDS"),
]

_ENDPOINT_FILES = (
    file("plain", "plain\n"),
    fifo("pipe"),
    folder("dir"),
    link("link-to-victim", "@OUT@/victim"),
)


def endpoints() -> Iterator[Case]:
    for text in _ENDPOINT_SYNTAX:
        if "\x00" in text:
            continue  # no NUL can reach argv
        yield Case(
            "endpoint",
            f"--port {text[:40]!r}",
            _nd("poetry", "--port", text),
            USAGE,
            expect="endpoint",
            offline=True,
        )
    for text, expect in _ENDPOINT_START:
        files = _ENDPOINT_FILES
        yield Case(
            "endpoint",
            f"--port {text[:40]!r} (at start)",
            _nd("poetry", "--port", text),
            # An interface that is no host name at all is refused as it is parsed (2);
            # one that resolves to nothing here, when tend listens (1).
            EITHER if "interface=" in text else START,
            expect=expect,
            files=files,
            offline="interface=" in text and "@BUSY@" not in text,
        )
    for name, env in [
        ("LISTEN_FDS=abc", (("LISTEN_FDS", "abc"), ("LISTEN_PID", "1"))),
        ("LISTEN_FDS=-1", (("LISTEN_FDS", "-1"),)),
        ("LISTEN_FDS huge", (("LISTEN_FDS", HUGE),)),
        ("LISTEN_FDS=1 another pid", (("LISTEN_FDS", "1"), ("LISTEN_PID", "1"))),
        ("LISTEN_FDS=1 LISTEN_PID huge", (("LISTEN_FDS", "1"), ("LISTEN_PID", HUGE))),
        ("LISTEN_FDS=0", (("LISTEN_FDS", "0"),)),
        ("LISTEN_FDNAMES newline", (("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "a\nb"))),
    ]:
        yield Case(
            "endpoint",
            f"systemd:index=0 with {name}",
            _nd("--pidfile=", "poetry", "--port", "systemd:index=0"),
            START,
            env=env,
        )


# -- certificates -----------------------------------------------------------------------------


def _tls(cert: str, key: str | None = None) -> tuple[str, ...]:
    text = f"tls:0:interface=127.0.0.1:certKey={cert}"
    if key is not None:
        text += f":privateKey={key}"
    return _nd("poetry", "--port", text)


_CERT_FILES = (
    file("empty.pem", b""),
    file("binary.pem", bytes(range(256)) * 4),
    file("text.pem", "not a certificate\n"),
    fifo("pipe.pem"),
    device("zero.pem", 1, 5),
    folder("dir.pem"),
    link("loop.pem", "loop.pem"),
    file("half.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n"),
    file("huge.pem", "-----BEGIN CERTIFICATE-----\n" + "A" * 3_000_000 + "\n"),
)


def certificates() -> Iterator[Case]:
    good_cert, good_key = "@PKI@/cert.pem", "@PKI@/key.pem"
    bad = {
        "missing": "missing.pem",
        "empty": "empty.pem",
        "binary": "binary.pem",
        "text": "text.pem",
        "FIFO": "pipe.pem",
        "/dev/zero": "zero.pem",
        "directory": "dir.pem",
        "symlink loop": "loop.pem",
        "half a PEM": "half.pem",
        "3 MB of base64": "huge.pem",
    }
    for what, name in bad.items():
        yield Case(
            "certificate",
            f"certKey {what}",
            _tls(name, good_key),
            START,
            expect=name,
            files=_CERT_FILES,
        )
        yield Case(
            "certificate",
            f"privateKey {what}",
            _tls(good_cert, name),
            START,
            expect=name,
            files=_CERT_FILES,
        )
    for what, cert, key, expect in [
        ("mismatched key", good_cert, "@PKI@/other-key.pem", "match"),
        ("key as certificate", good_key, good_key, None),
        ("certificate as key", good_cert, good_cert, None),
        ("encrypted key", good_cert, "@PKI@/encrypted-key.pem", "encrypted"),
        ("swapped", good_key, good_cert, None),
        ("CA bundle without key", good_cert, None, None),
    ]:
        yield Case("certificate", what, _tls(cert, key), START, expect=expect)


# -- deployment files -------------------------------------------------------------------------

_TEND_KEYS = {
    # key: wrong values (TOML text) for it
    "nodaemon": ['"yes"', "1", "[]", "{a = 1}", "1979-05-27T07:32:00Z"],
    "pidfile": ["true", "[]", "{a = 1}", "1979-05-27", "1.5", '"-"'],
    "logfile": ["true", "[]", "{a = 1}", "07:32:00", '"@CASE@/missing/x.log"'],
    "log-max-bytes": ['"abc"', "-1", "1.5", "true", "[]", "nan"],
    "log-backups": ['"abc"', "-1", "1.5", "true", "{}", "inf"],
    "log-format": ['"xml"', "1", "true", "[]"],
    "log-level": ['"loud"', "10", "true", "[]", '"INFO"'],
    "syslog": ['"true"', "0", "[]"],
    "prefix": ["true", "[]", "{a = 1}"],
    "syslog-facility": ["true", "[]", '"nosuch"'],
    "syslog-address": ["true", "[]", '""'],
    "uid": ["true", "[]", "-1", "4294967295", "1.5"],
    "gid": ["true", "[]", "-1", "4294967296", "1.5"],
    "umask": ["27", '"8"', "true", "[]", '"-1"', '"1000"'],
    "rundir": ["true", "[]", '"@CASE@/missing"', '"@CASE@/deploy.toml"'],
    "chroot": ["true", "[]", '"@CASE@/missing"'],
    "loop": ['"trio"', "1", "true", "[]"],
    "shutdown-timeout": ['"abc"', "-1", "nan", "inf", "true", "1e309", '"86401"'],
    "workers": ["0", "-1", '"many"', "1.5", "true", "1000000", "[]"],
}


def _deploy(name: str, text: str, **fields: object) -> Case:
    return Case(
        "deployment",
        name,
        _nd("-c", "deploy.toml"),
        START,
        files=(file("deploy.toml", text),),
        **fields,  # type: ignore[arg-type]
    )


def deployments() -> Iterator[Case]:
    for key, values in _TEND_KEYS.items():
        for value in values:
            yield _deploy(f"[tend] {key} = {value[:30]}", f"[tend]\n{key} = {value}\n{SERVICE}")
    syntax = {
        "unclosed table": "[tend\n",
        "missing value": "[tend]\npidfile =\n",
        "unterminated string": '[tend]\npidfile = "abc\n',
        "bare key only": "= 1\n",
        "bare word value": "[[service]]\nplugin = poetry\n",
        "duplicate key": '[[service]]\nplugin = "poetry"\nplugin = "poetry"\n',
        "duplicate table": "[tend]\n[tend]\n" + SERVICE,
        "table then array": "[service]\n[[service]]\n",
        "NUL in text": "[tend]\x00\n",
        "BOM": "\ufeff[tend]\n" + SERVICE,
        "not UTF-8": b'[tend]\npidfile = "\xff"\n',
        "Latin-1 name": b"# caf\xe9\n",
        "CR alone": "[tend]\rpidfile = 'a'\n",
        "control character in string": '[tend]\nprefix = "a\x01b"\n' + SERVICE,
        "nested arrays 5,000 deep": "a = " + "[" * 5000 + "]" * 5000 + "\n",
        "nested tables 5,000 deep": "a = " + "{b = " * 5000 + "1" + "}" * 5000 + "\n",
        "dotted key 5,000 deep": ".".join(["k"] * 5000) + " = 1\n",
        "5,000-digit integer in [tend]": "[tend]\nlog-max-bytes = " + "1" * 5000 + "\n" + SERVICE,
        "5,000-digit integer port": '[[service]]\nplugin = "poetry"\nport = ' + "1" * 5000 + "\n",
        "huge exponent": "[tend]\nshutdown-timeout = 1e99999\n" + SERVICE,
        "long line of garbage": "#" + "\x7f" * 10 + "\n" + "x" * 100_000 + "\n",
        "empty file": "",
        "only [tend]": "[tend]\nnodaemon = true\n",
        "empty service array": "service = []\n",
        "service as table": '[service]\nplugin = "poetry"\n',
        "service as string": 'service = "poetry"\n',
        "service array of strings": 'service = ["poetry"]\n',
        "tend as array": '[[tend]]\npidfile = "x"\n' + SERVICE,
        "tend as string": 'tend = "x"\n' + SERVICE,
        "unknown table": "[tnd]\n" + SERVICE,
        "unknown top-level key": "x = 1\n" + SERVICE,
        "unknown [tend] key": "[tend]\nbogus = 1\n" + SERVICE,
        "unknown [tend] key, 200,000 characters": f'[tend]\n"{"k" * 200_000}" = 1\n' + SERVICE,
        "[tend] key given twice": "[tend]\nlog-max-bytes = 1\nlog_max_bytes = 2\n" + SERVICE,
        "missing plugin": "[[service]]\nname = 'a'\n",
        "plugin = 5": "[[service]]\nplugin = 5\n",
        "plugin = ''": "[[service]]\nplugin = ''\n",
        "plugin = []": "[[service]]\nplugin = []\n",
        "unknown plugin": "[[service]]\nplugin = 'petry'\n",
        "plugin with escape": '[[service]]\nplugin = "\\u001b[2Jpoetry"\n',
        "plugin with newline": '[[service]]\nplugin = "po\\netry"\n',
        "plugin of 200,000 characters": f"[[service]]\nplugin = '{'p' * 200_000}'\n",
        "name = ''": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\nname = ''\n",
        "name = 5": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\nname = 5\n",
        "name with newline": f'[[service]]\nplugin = "poetry"\nport = "{LOCAL}"\nname = "a\\nb"\n'
        "chunk-size = 0\n",
        "name of 200,000 characters": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\n"
        f"name = '{'n' * 200_000}'\nchunk-size = 0\n",
        "duplicate names": "[[service]]\nplugin = 'poetry'\nname = 'a'\nport = 'tcp:0'\n"
        "[[service]]\nplugin = 'poetry'\nname = 'a'\nport = 'tcp:0'\n",
        "default name taken": "[[service]]\nplugin = 'poetry'\nname = 'poetry-2'\nport = 'tcp:0'\n"
        "[[service]]\nplugin = 'poetry'\nport = 'tcp:0'\n",
        "unknown plugin option": "[[service]]\nplugin = 'poetry'\nprot = 1\n",
        "plugin option twice": "[[service]]\nplugin = 'poetry'\nchunk-size = 1\nchunk_size = 2\n",
        "port array": "[[service]]\nplugin = 'poetry'\nport = [1]\n",
        "port table": "[[service]]\nplugin = 'poetry'\nport = {a = 1}\n",
        "port true": "[[service]]\nplugin = 'poetry'\nport = true\n",
        "port -1": "[[service]]\nplugin = 'poetry'\nport = -1\n",
        "port 65536": "[[service]]\nplugin = 'poetry'\nport = 65536\n",
        "port 1.5": "[[service]]\nplugin = 'poetry'\nport = 1.5\n",
        "port nan": "[[service]]\nplugin = 'poetry'\nport = nan\n",
        "port date": "[[service]]\nplugin = 'poetry'\nport = 1979-05-27\n",
        "port 200,000 characters": f"[[service]]\nplugin = 'poetry'\nport = '{'1' * 200_000}'\n",
        "port busy": "[[service]]\nplugin = 'poetry'\nport = 'tcp:@BUSY@:interface=127.0.0.1'\n",
        "chunk-size 0": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\nchunk-size = 0\n",
        "delay -1": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\ndelay = -1\n",
        "delay nan": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\ndelay = nan\n",
        "delay inf": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\ndelay = inf\n",
        "delay true": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\ndelay = true\n",
        "poem missing": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\npoem = 'no.txt'\n",
        "poem array": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\npoem = ['a']\n",
        "poem 200,000 characters": f"[[service]]\nplugin = 'poetry'\nport = '{LOCAL}'\n"
        f"poem = '{'p' * 200_000}'\n",
        "poem with control characters": f'[[service]]\nplugin = "poetry"\nport = "{LOCAL}"\n'
        'poem = "\\u001b]0;owned\\u0007"\n',
        "proxy without server": f"[[service]]\nplugin = 'poetry-proxy'\nport = '{LOCAL}'\n",
        "proxy server a:b:c": f"[[service]]\nplugin = 'poetry-proxy'\nport = '{LOCAL}'\n"
        "server = 'a:b:c'\n",
        "proxy server 0": f"[[service]]\nplugin = 'poetry-proxy'\nport = '{LOCAL}'\nserver = 0\n",
        "proxy timeout 0": f"[[service]]\nplugin = 'poetry-proxy'\nport = '{LOCAL}'\n"
        "server = '1'\ntimeout = 0\n",
        "[tend] pidfile 200,000 characters": f"[tend]\npidfile = '{'q' * 200_000}'\n" + SERVICE,
        "[tend] logfile 200,000 characters": f"[tend]\nlogfile = '{'q' * 200_000}'\n" + SERVICE,
        "[tend] prefix with newline": '[tend]\nsyslog = true\nprefix = "a\\nb"\n'
        'syslog-address = "@CASE@/none.sock"\n' + SERVICE,
        "[tend] pidfile with newline": '[tend]\npidfile = "a\\nb.pid"\nrundir = "@CASE@/no"\n'
        + SERVICE,
        "[tend] umask 200,000 digits": f"[tend]\numask = '{'7' * 200_000}'\n" + SERVICE,
        "[tend] workers 200,000 digits": f"[tend]\nworkers = '{'7' * 200_000}'\n" + SERVICE,
    }
    for name, text in syntax.items():
        yield _deploy(name, text)
    for name, items in {
        "missing": (),
        "a directory": (folder("deploy.toml"),),
        "a FIFO": (fifo("deploy.toml"),),
        "/dev/zero": (device("deploy.toml", 1, 5),),
        "a symlink loop": (link("deploy.toml", "deploy.toml"),),
        "a symlink to a victim": (link("deploy.toml", "@OUT@/victim"),),
        "a socket": (socket_file("deploy.toml"),),
    }.items():
        yield Case("deployment", f"-c {name}", _nd("-c", "deploy.toml"), START, files=items)
    yield Case("deployment", "-c a path of 5,000 characters", _nd("-c", LONG), START)
    yield Case("deployment", "-c ''", _nd("-c", ""), EITHER)
    yield Case(
        "deployment",
        "-c a file of 20 MB",
        _nd("-c", "deploy.toml"),
        START,
        files=(file("deploy.toml", "# " + "x" * 20_000_000 + "\n"),),
    )


# -- app files --------------------------------------------------------------------------------

_APP_HEAD = "import tend\n"
_GOOD_APP = _APP_HEAD + (
    "from tend.poetry.server import PoetryFactory, PoetryService\n"
    "from tend.poetry import DEFAULT_POEM\n"
    "application = tend.Application('x')\n"
    "poetry = PoetryService(DEFAULT_POEM)\n"
    "poetry.set_service_parent(application)\n"
    f"tend.StreamServer('{LOCAL}', PoetryFactory(poetry)).set_service_parent(application)\n"
)


def _service_app(body: str, method: str = "start_service") -> str:
    head = "async " if method != "privileged_start_service" else ""
    return _APP_HEAD + (
        "class Bad(tend.Service):\n"
        f"    {head}def {method}(self):\n"
        + "".join(f"        {line}\n" for line in body.splitlines())
        + "application = tend.Application('x')\n"
        "Bad('bad').set_service_parent(application)\n"
    )


_APPS: dict[str, tuple[str | bytes, bool]] = {
    # name: (source, the traceback in the log may be the user's)
    "syntax error": ("def (:\n", False),
    "indentation error": ("if 1:\npass\n", False),
    "NUL byte": (b"x = 1\x00\n", False),
    "not UTF-8": (b"x = '\xff'\n", False),
    "no application": ("x = 1\n", False),
    "application = 5": ("application = 5\n", False),
    "application = None": ("application = None\n", False),
    "application a MultiService": (_APP_HEAD + "application = tend.MultiService()\n", False),
    "application a class": (_APP_HEAD + "application = tend.Application\n", False),
    "sys.exit(0)": ("import sys\nsys.exit(0)\n", True),
    "sys.exit(3)": ("import sys\nsys.exit(3)\n", True),
    "sys.exit('a\\nb')": ("import sys\nsys.exit('a\\nb')\n", True),
    "sys.exit(None)": ("import sys\nsys.exit(None)\n", True),
    "raise SystemExit(2**70)": ("raise SystemExit(2**70)\n", True),
    "raise BaseException": ("raise BaseException('base')\n", True),
    "raise KeyboardInterrupt": ("raise KeyboardInterrupt\n", True),
    "raise GeneratorExit": ("raise GeneratorExit\n", True),
    "__str__ raises": (
        "class E(Exception):\n    def __str__(self):\n"
        "        raise RuntimeError('no')\nraise E()\n",
        True,
    ),
    "__repr__ and __str__ raise": (
        "class E(Exception):\n    def __str__(self):\n        raise E()\n"
        "    __repr__ = __str__\nraise E()\n",
        True,
    ),
    "message of 100,000 characters": ("raise ValueError('m' * 100_000)\n", True),
    "message with escapes": ("raise ValueError('\\x1b[2J\\x1b]0;owned\\x07\\u202e')\n", True),
    "message with newlines": ("raise ValueError('one\\ntwo\\r\\nthree')\n", True),
    "RecursionError": ("def f():\n    return f()\nf()\n", True),
    "MemoryError": ("raise MemoryError\n", True),
    "import of a missing module": ("import no_such_module_torture\n", True),
    "os._exit(0) at import": ("import os\nos._exit(0)\n", True),
    "os._exit(1) at import": ("import os\nos._exit(1)\n", True),
    "two services with one name": (
        _APP_HEAD + "application = tend.Application('x')\n"
        "tend.Service('a').set_service_parent(application)\n"
        "tend.Service('a').set_service_parent(application)\n",
        False,
    ),
    "service named with a newline": (
        _APP_HEAD + "application = tend.Application('x')\n"
        "s = tend.Service('a\\nb')\ns.set_service_parent(application)\n"
        "tend.Service('a\\nb').set_service_parent(application)\n",
        False,
    ),
    "unknown uid in Application": (
        _APP_HEAD + "application = tend.Application('x', uid='nosuch-torture')\n",
        False,
    ),
    "bad endpoint in StreamServer": (
        _APP_HEAD + "application = tend.Application('x')\n"
        "tend.StreamServer('tcp:abc', object).set_service_parent(application)\n",
        False,
    ),
    "SystemExit in start_service": (_service_app("raise SystemExit(0)"), True),
    "SystemExit(3) in start_service": (_service_app("raise SystemExit(3)"), True),
    "ValueError in start_service": (_service_app("raise ValueError('start')"), True),
    "KeyboardInterrupt in start_service": (_service_app("raise KeyboardInterrupt"), True),
    "BaseException in start_service": (_service_app("raise BaseException('b')"), True),
    "CancelledError in start_service": (
        _service_app("import asyncio\nraise asyncio.CancelledError()"),
        True,
    ),
    "os._exit(0) in start_service": (_service_app("import os\nos._exit(0)"), True),
    "ValueError in privileged_start_service": (
        _service_app("raise ValueError('p')", "privileged_start_service"),
        True,
    ),
    "SystemExit in privileged_start_service": (
        _service_app("raise SystemExit(0)", "privileged_start_service"),
        True,
    ),
    "listener on a busy port": (
        _GOOD_APP.replace(LOCAL, "tcp:@BUSY@:interface=127.0.0.1"),
        False,
    ),
}


def app_files() -> Iterator[Case]:
    for name, (source, user_code) in _APPS.items():
        for detached in (False, True):
            if detached and not user_code and name not in ("syntax error", "no application"):
                continue
            args = ("-y", "app.py") if detached else _nd("-y", "app.py")
            yield Case(
                "app-file",
                name + (" (detached)" if detached else ""),
                args,
                START,
                files=(file("app.py", source),),
                user_code=user_code,
            )
    for name, items in {
        "missing": (),
        "a directory": (folder("app.py"),),
        "a FIFO": (fifo("app.py"),),
        "/dev/zero": (device("app.py", 1, 5),),
        "a symlink loop": (link("app.py", "app.py"),),
    }.items():
        yield Case("app-file", f"-y {name}", _nd("-y", "app.py"), START, files=items)
    yield Case("app-file", "-y a path of 5,000 characters", _nd("-y", LONG), START)
    yield Case("app-file", "-y ''", _nd("-y", ""), EITHER)


# -- pidfiles ---------------------------------------------------------------------------------


def pidfiles() -> Iterator[Case]:
    contents: dict[str, bytes] = {
        "holding '²'": SUPERSCRIPT_TWO.encode(),
        "holding '²' and a newline": (SUPERSCRIPT_TWO + "\n").encode(),
        "holding garbage": b"garbage\n",
        "holding -5": b"-5\n",
        "holding binary": bytes(range(1, 64)),
        "holding an escape": b"\x1b[2J\x1b]0;owned\x07",
        "holding a 100 KB line": b"7" * 100_000,
        "holding NULs": b"\x00" * 10,
        "holding 1.5": b"1.5\n",
        "holding a pid and garbage": b"1\ngarbage\n",
    }
    for name, data in contents.items():
        for detached in (False, True):
            if detached and name not in ("holding '²'", "holding garbage"):
                continue
            args = ("--pidfile", "p.pid", *SERVE)
            yield Case(
                "pidfile",
                name + (" (detached)" if detached else ""),
                args if detached else _nd(*args),
                START,
                expect="pidfile",
                files=(file("p.pid", data),),
            )
    for name, items in {
        "a directory": (folder("p.pid"),),
        "a FIFO": (fifo("p.pid"),),
        "a device node (zero)": (device("p.pid", 1, 5),),
        "a device node (null)": (device("p.pid", 1, 3),),
        "a socket": (socket_file("p.pid"),),
        "a symlink to a victim": (link("p.pid", "@OUT@/victim"),),
        "a symlink to an empty victim": (link("p.pid", "@OUT@/empty"),),
        "a symlink to a folder": (link("p.pid", "@OUT@/dir"),),
        "a symlink loop": (link("p.pid", "p.pid"),),
        "in a folder that is a file": (file("f", "x"),),
    }.items():
        path = "f/p.pid" if "folder that is a file" in name else "p.pid"
        yield Case(
            "pidfile",
            name,
            _nd("--pidfile", path, *SERVE),
            START,
            expect="pidfile",
            files=items,
        )
    yield Case(
        "pidfile",
        "locked by a live server",
        _nd("--pidfile", "p.pid", *SERVE),
        START,
        expect="running",
        files=(file("p.pid", "1\n"),),
        lock="p.pid",
    )
    yield Case(
        "pidfile",
        "locked, holding '²'",
        _nd("--pidfile", "p.pid", *SERVE),
        START,
        files=(file("p.pid", SUPERSCRIPT_TWO),),
        lock="p.pid",
    )
    yield Case(
        "pidfile",
        "locked, holding an escape",
        _nd("--pidfile", "p.pid", *SERVE),
        START,
        files=(file("p.pid", "\x1b[2J"),),
        lock="p.pid",
    )
    yield Case("pidfile", "a name of 300 characters", _nd("--pidfile", "p" * 300, *SERVE), START)
    yield Case(
        "pidfile",
        "in a missing folder",
        _nd("--pidfile", "no/p.pid", *SERVE),
        START,
        expect="pidfile",
    )


# -- log paths --------------------------------------------------------------------------------


def log_paths() -> Iterator[Case]:
    items: dict[str, tuple[str, tuple[Put, ...]]] = {
        "a directory": ("x.log", (folder("x.log"),)),
        "a FIFO": ("x.log", (fifo("x.log"),)),
        "a device (zero)": ("x.log", (device("x.log", 1, 5),)),
        "a device (full)": ("x.log", (device("x.log", 1, 7),)),
        "a device (null)": ("x.log", (device("x.log", 1, 3),)),
        "a socket": ("x.log", (socket_file("x.log"),)),
        "a missing folder": ("no/x.log", ()),
        "a folder that is a file": ("f/x.log", (file("f", "x"),)),
        "a symlink to a victim": ("x.log", (link("x.log", "@OUT@/victim"),)),
        "a symlink to a missing file outside": ("x.log", (link("x.log", "@OUT@/new"),)),
        "a symlink loop": ("x.log", (link("x.log", "x.log"),)),
        "a name of 300 characters": ("l" * 300, ()),
        "/dev/full": ("/dev/full", ()),
    }
    for name, (path, files) in items.items():
        for detached in (False, True):
            if detached and name not in ("a directory", "a FIFO", "a missing folder"):
                continue
            args = ("-l", path, *SERVE)
            yield Case(
                "log-path",
                name + (" (detached)" if detached else ""),
                args if detached else _nd(*args),
                START,
                files=files,
            )
    yield Case("log-path", "'-' when detached", ("-l", "-", *SERVE), START, expect="--logfile")
    yield Case(
        "log-path",
        "default log in a rundir that is a FIFO folder",
        ("-d", "@CASE@/missing", *SERVE),
        START,
    )
    yield Case(
        "log-path",
        "rotation into a directory",
        _nd("-l", "x.log", "--log-max-bytes", "1", *SERVE),
        START,
        files=(file("x.log", "x" * 10), folder("x.log.1")),
        may_create=(r".*x\.log.*",),
    )


# -- poems ------------------------------------------------------------------------------------


def poems() -> Iterator[Case]:
    items: dict[str, tuple[str, tuple[Put, ...]]] = {
        "missing": ("no.txt", ()),
        "a directory": ("p.txt", (folder("p.txt"),)),
        "a FIFO": ("p.txt", (fifo("p.txt"),)),
        "/dev/zero": ("/dev/zero", ()),
        "a device (zero)": ("p.txt", (device("p.txt", 1, 5),)),
        "a symlink loop": ("p.txt", (link("p.txt", "p.txt"),)),
        "a socket": ("p.txt", (socket_file("p.txt"),)),
        "empty": ("p.txt", (file("p.txt", b""),)),
        "in a missing folder": ("no/p.txt", ()),
        "a name of 300 characters": ("p" * 300, ()),
        "a path of 5,000 characters": (LONG, ()),
        "''": ("", ()),
    }
    for name, (path, files) in items.items():
        for detached in (False, True):
            if detached and name not in ("missing", "a FIFO", "/dev/zero", "a directory"):
                continue
            args = ("--pidfile", "p.pid", "poetry", "--port", LOCAL, "--poem", path)
            yield Case(
                "poem",
                name + (" (detached)" if detached else ""),
                args if detached else _nd(*args),
                START,
                expect="poem",
                files=files,
            )


# -- odd paths: FIFOs for -c and -y, a newline, an undecodable byte -----------------------------


def odd_paths() -> Iterator[Case]:
    for option in ("-c", "-y"):
        for what, odd in [("a newline", NEWLINE_NAME), ("an undecodable byte", UNDECODABLE)]:
            yield Case("path", f"{option} missing, with {what}", _nd(option, odd), START)
            yield Case(
                "path",
                f"{option} broken, with {what}",
                _nd(option, odd),
                START,
                files=(file(odd, "[[[\n" if option == "-c" else "def (:\n"),),
            )
        yield Case(
            "path",
            f"{option} a FIFO named with an escape",
            _nd(option, "\x1b[2J"),
            START,
            files=(fifo("\x1b[2J"),),
        )
    for option in ("--pidfile", "-l", "-d"):
        for what, odd in [("a newline", NEWLINE_NAME), ("an undecodable byte", UNDECODABLE)]:
            path = f"no/{odd}" if option != "-d" else odd
            yield Case(
                "path",
                f"{option} with {what}",
                _nd(option, path, *SERVE),
                EITHER,
            )
    for what, odd in [("a newline", NEWLINE_NAME), ("an undecodable byte", UNDECODABLE)]:
        yield Case(
            "path",
            f"--poem with {what}",
            _nd("--pidfile=", "poetry", "--port", LOCAL, "--poem", odd),
            START,
        )
        yield Case(
            "path",
            f"unix: socket with {what}",
            _nd("--pidfile=", "poetry", "--port", f"unix:no/{odd}"),
            START,
        )
        yield Case(
            "path",
            f"certKey with {what}",
            _nd("--pidfile=", "poetry", "--port", f"tls:0:certKey={odd}"),
            START,
        )


# -- tendctl ----------------------------------------------------------------------------------


def tendctl() -> Iterator[Case]:
    for action, status in [("status", 4), ("stop", 1), ("reopen-logs", 1)]:
        for name, items in {
            "holding '²'": (file("p.pid", SUPERSCRIPT_TWO),),
            "holding garbage": (file("p.pid", "garbage"),),
            "a directory": (folder("p.pid"),),
            "a FIFO": (fifo("p.pid"),),
            "a device (zero)": (device("p.pid", 1, 5),),
            "a symlink loop": (link("p.pid", "p.pid"),),
            "holding an escape": (file("p.pid", "\x1b[2J\x07"),),
        }.items():
            yield Case(
                "tendctl",
                f"{action}, pidfile {name}",
                ("--pidfile", "p.pid", action),
                status,
                expect="pidfile",
                program="tendctl",
                files=items,
            )
        yield Case(
            "tendctl",
            f"{action}, pidfile locked holding '²'",
            ("--pidfile", "p.pid", action),
            status,
            program="tendctl",
            files=(file("p.pid", SUPERSCRIPT_TWO),),
            lock="p.pid",
        )
        yield Case(
            "tendctl",
            f"{action}, pidfile locked holding a huge pid",
            ("--pidfile", "p.pid", action),
            EITHER if action != "status" else 4,
            program="tendctl",
            files=(file("p.pid", "9" * 30),),
            lock="p.pid",
        )
    for value in ["-1", "nan", "inf", "abc", "", "1e999", "86401", ARABIC_ONE]:
        yield Case(
            "tendctl",
            f"stop --timeout {value!r}",
            ("stop", "--timeout", value),
            USAGE,
            expect="timeout",
            program="tendctl",
        )
    for args, expect in [
        (("restart",), "restart"),
        ((), None),
        (("status", "extra"), "extra"),
        (("--bogus", "status"), "--bogus"),
        (("stop", "--timeout"), "--timeout"),
        (("--pidfile",), "--pidfile"),
        (("\x1b[2J",), None),
        (("x" * 3000,), None),
    ]:
        yield Case(
            "tendctl",
            "args " + repr(args)[:40],
            args,
            USAGE,
            expect=expect,
            program="tendctl",
        )
    yield Case(
        "tendctl",
        "status, pidfile a path of 5,000 characters",
        ("--pidfile", LONG, "status"),
        4,
        program="tendctl",
    )
    yield Case(
        "tendctl",
        "stop, pidfile ''",
        ("--pidfile", "", "stop"),
        EITHER,
        program="tendctl",
    )


# -- get-poetry -------------------------------------------------------------------------------


def get_poetry() -> Iterator[Case]:
    addresses = {
        "\u202e:1": EITHER,
        "[:10": USAGE,
        ":": USAGE,
        ":1": USAGE,
        "1:": USAGE,
        "": USAGE,
        "localhost:0": USAGE,
        "localhost:65536": USAGE,
        "localhost:" + HUGE: USAGE,
        "localhost:" + "9" * 5000: USAGE,
        "[::1]": USAGE,
        "::1:10": USAGE,
        "[]:10": USAGE,
        "\u0663": USAGE,
        "localhost:\u0663": USAGE,
        "a" * 64 + ":1": EITHER,
        "a" * 300 + ":1": EITHER,
        "a..b:1": EITHER,
        "[::1%nosuchif]:1": EITHER,
        "\x1b[2J:1": EITHER,
        "a\nb:1": EITHER,
        "-1": USAGE,
        "x" * 5000: USAGE,
    }
    for address, status in addresses.items():
        yield Case(
            "get-poetry",
            f"address {address[:30]!r}",
            ("--timeout", "1", address),
            status,
            program="get-poetry",
            offline=True,
        )
    for value in ["0", "-1", "nan", "inf", "abc", "", "1e999", "86401", ARABIC_ONE]:
        yield Case(
            "get-poetry",
            f"--timeout {value!r}",
            ("--timeout", value, "1"),
            USAGE,
            expect="timeout",
            program="get-poetry",
        )
    for name, (directory, items) in {
        "too long": ("d" * 5000, ()),
        "a name of 300 characters": ("d" * 300, ()),
        "a file": ("f", (file("f", "x"),)),
        "a FIFO": ("p", (fifo("p"),)),
        "below a file": ("f/d", (file("f", "x"),)),
        "with an escape": ("\x1b[2J/\x1b[2J", (file("\x1b[2J", "x"),)),
    }.items():
        yield Case(
            "get-poetry",
            f"--output-dir {name}",
            ("--output-dir", directory, "--timeout", "1", "1"),
            START,
            program="get-poetry",
            files=items,
        )
    for args, expect in [
        ((), None),
        (("--bogus", "1"), "--bogus"),
        (("--timeout",), "--timeout"),
        (("--output-dir",), "--output-dir"),
    ]:
        yield Case(
            "get-poetry",
            "args " + repr(args)[:40],
            args,
            USAGE,
            expect=expect,
            program="get-poetry",
        )


# -- the poetry proxy ----------------------------------------------------------------------


def proxy() -> Iterator[Case]:
    for value, status in {
        "": USAGE,
        ":": USAGE,
        "a:b": USAGE,
        "::1:10": USAGE,
        "[::1": USAGE,
        "localhost:0": USAGE,
        "localhost:65536": USAGE,
        "\u0663": USAGE,
        "0": USAGE,
        "x" * 300 + ":1": EITHER,
        "a..b:1": EITHER,
        "\u202e:1": EITHER,
        "\x1b[2J:1": EITHER,
    }.items():
        yield Case(
            "proxy",
            f"--server {value[:30]!r}",
            _nd("--pidfile=", "poetry-proxy", "--port", LOCAL, "--server", value),
            status,
            expect="server",
            offline=True,
        )
    for option, values in {
        "--timeout": ["0", "-1", "nan", "inf", "abc", ""],
        "--cache-ttl": ["-1", "nan", "abc", "1e999"],
    }.items():
        for value in values:
            yield Case(
                "proxy",
                f"{option} {value!r}",
                _nd("--pidfile=", "poetry-proxy", "--port", LOCAL, "--server", "1", option, value),
                USAGE,
                expect=option.lstrip("-"),
            )


# -- all of them --------------------------------------------------------------------------------

_SOURCES = (
    runner_options,
    identities,
    plugin_options,
    endpoints,
    certificates,
    deployments,
    app_files,
    pidfiles,
    log_paths,
    poems,
    odd_paths,
    tendctl,
    get_poetry,
    proxy,
)


def all_cases() -> list[Case]:
    """Every enumerated case, each id unique."""
    cases: list[Case] = []
    seen: set[str] = set()
    for source in _SOURCES:
        for case in source():
            name = case.id
            number = 2
            while name in seen:
                name = f"{case.id} #{number}"
                number += 1
            seen.add(name)
            if name != case.id:
                case = Case(**{**_fields(case), "name": name.split(":", 1)[1]})
            cases.append(case)
    return cases


def _fields(case: Case) -> dict[str, object]:
    return {name: getattr(case, name) for name in Case.__dataclass_fields__}


def sample(cases: Iterable[Case], per_kind: int = 5) -> list[Case]:
    """A representative few of each kind, the same every time: spread evenly over the kind."""
    by_kind: dict[str, list[Case]] = {}
    for case in cases:
        by_kind.setdefault(case.kind, []).append(case)
    chosen = []
    for kind_cases in by_kind.values():
        step = max(1, len(kind_cases) // per_kind)
        chosen += kind_cases[::step][:per_kind]
    return chosen
