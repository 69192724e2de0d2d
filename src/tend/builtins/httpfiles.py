"""What ``tend web`` answers to a GET or HEAD: a file, a range of it, a listing, or a refusal.

`Site.respond` maps a request target to a file under the root and builds the `Reply`:
status, headers, and a body of bytes and `FileSlice` pieces that the connection sends
(slices by ``loop.sendfile``). It owns the safety of that mapping: the target is decoded
once and ``..``, ``.``, encoded slashes, backslashes and NUL are refused; dotfiles are
hidden; a path whose real location is outside the root (through a symlink) is refused
unless the operator asked to follow symlinks; only regular files and folders are served.

It makes blocking file-system calls and no network ones: the connection calls `respond`
in a worker thread. It knows nothing of HTTP framing (see `tend.builtins.httpserver`).
"""

from __future__ import annotations

import email.utils
import errno
import html
import io
import mimetypes
import os
import re
import secrets
import stat
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

# More ranges than this in one Range header and the header is ignored (the whole file is
# sent, 200): a flood of small or overlapping ranges costs the server no more than one GET.
MAX_RANGES = 16

# A file up to this size is read and sent with the head in one write; larger ones go
# by sendfile after it.
SMALL_FILE = 16 * 1024

# What the OS is asked when opening: never block on a FIFO, never leak into children.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
_BAD_ESCAPE = re.compile(rb"%(?![0-9a-fA-F]{2})")


@dataclass(frozen=True, slots=True)
class FileSlice:
    """*count* bytes of *file* from *offset*: a piece of a body, sent with ``loop.sendfile``."""

    file: io.FileIO
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(slots=True)
class Reply:
    """A response: *status*, *headers*, and a *body* of bytes and file slices.

    *file*, when set, is open and the sender closes it once the body is sent (or not).
    *close* asks for the connection to close after this response.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes | FileSlice] = field(default_factory=list)
    file: io.FileIO | None = None
    close: bool = False

    @property
    def length(self) -> int:
        """The body's length in bytes, as Content-Length says."""
        return sum(len(part) for part in self.body)

    def discard(self) -> None:
        """Close the file this reply holds, if any: it will not be sent."""
        if self.file is not None:
            self.file.close()
            self.file = None


def error_reply(
    status: int, *, close: bool = False, headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    """A short plain-text reply such as ``404 Not Found``."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    return Reply(
        status,
        [
            *headers,
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("x-content-type-options", "nosniff"),
        ],
        [body],
        close=close,
    )


class Refused(Exception):
    """A request that gets an error reply instead of a file: *status* says which."""

    def __init__(self, status: int, location: str | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.location = location


@dataclass(frozen=True, slots=True)
class Target:
    """A request target made safe: the decoded path segments, and whether it ended in ``/``."""

    segments: tuple[bytes, ...]
    slash: bool


def parse_target(target: bytes, *, show_dotfiles: bool) -> Target:
    """Decode a request target once and refuse what could climb or hide.

    Raises:
        Refused: 400 for a target that is not a path or has ``.``/``..`` segments, an
            encoded slash, a backslash, NUL or a broken escape; 404 for a dotfile when
            dotfiles are hidden.
    """
    if target.startswith(b"/"):
        path = target
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # The absolute form (RFC 9112 §3.2.2): a server must accept it; only its path counts.
        path = urllib.parse.urlsplit(target).path or b"/"
    else:
        raise Refused(400)
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    if _ENCODED_SLASH.search(path) or _BAD_ESCAPE.search(path):
        raise Refused(400)
    decoded = urllib.parse.unquote_to_bytes(path)
    if b"\x00" in decoded or b"\\" in decoded:
        raise Refused(400)
    segments = tuple(segment for segment in decoded.split(b"/") if segment)
    for segment in segments:
        if segment in (b".", b".."):
            raise Refused(400)
        if segment.startswith(b".") and not show_dotfiles:
            raise Refused(404)
    return Target(segments, decoded.endswith(b"/"))


def href(segments: tuple[bytes, ...], slash: bool) -> str:
    """The path-only URL of *segments*: always one leading ``/``, never ``//host``."""
    path = "/".join(urllib.parse.quote(segment, safe="") for segment in segments)
    return "/" + path + ("/" if slash and path else "")


def http_date(timestamp: float) -> str:
    """*timestamp* as an HTTP date: ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_http_date(text: str) -> float | None:
    """An HTTP date as a timestamp, or None if it is not one."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def etag_of(info: os.stat_result) -> str:
    """A strong validator from size and modification time (RFC 9110 §8.8.3)."""
    return f'"{info.st_size:x}-{info.st_mtime_ns:x}"'


def etag_listed(header: str, etag: str) -> bool:
    """Whether If-None-Match *header* names *etag*, compared weakly, or is ``*``."""
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges a Range header asks of a *size*-byte file, sorted and merged.

    Returns None when the header is to be ignored (not bytes, malformed, more than
    `MAX_RANGES` ranges) and an empty list when no range is satisfiable (416). Each range
    is ``(first, last)`` inclusive; overlapping and adjacent ranges are merged, so that
    the body is never larger than the file.
    """
    unit, equals, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not equals:
        return None
    parts = [part.strip() for part in specs.split(",")]
    parts = [part for part in parts if part]
    if not parts or len(parts) > MAX_RANGES:
        return None
    wanted: list[tuple[int, int]] = []
    for part in parts:
        first, dash, last = part.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not _digits(first or "0") or not _digits(last or "0"):
            return None
        if not first:
            if not last:
                return None
            length = int(last)  # a suffix: the last *length* bytes
            if length and size:
                wanted.append((max(0, size - length), size - 1))
            continue
        start = int(first)
        end = size - 1 if not last else int(last)
        if last and end < start:
            return None
        if start < size:
            wanted.append((start, min(end, size - 1)))
    wanted.sort()
    merged: list[tuple[int, int]] = []
    for start, end in wanted:
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def content_type(name: bytes) -> str:
    """The media type for a file name; octet-stream when unknown."""
    guessed, encoding = mimetypes.guess_type(os.fsdecode(name), strict=False)
    if encoding == "gzip":
        return "application/gzip"
    if encoding is not None or guessed is None:
        return "application/octet-stream"
    return guessed


class Site:
    """The folder ``tend web`` serves, and how: listing, dotfiles, symlinks, index name."""

    def __init__(
        self,
        root: str,
        *,
        listing: bool = True,
        show_dotfiles: bool = False,
        follow_symlinks: bool = False,
        index: str = "index.html",
    ) -> None:
        self.root = root
        self.listing = listing
        self.show_dotfiles = show_dotfiles
        self.follow_symlinks = follow_symlinks
        self.index = os.fsencode(index)
        self._real_root = os.fsencode(os.path.realpath(root))

    def check(self) -> None:
        """Make sure the root is a folder that can be read; take its real path now.

        Raises:
            OSError: it cannot be read or is not a folder (ENOTDIR).
        """
        real = os.path.realpath(self.root, strict=True)
        if not os.path.isdir(real):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), self.root)
        with os.scandir(real):
            pass  # readable, without reading a large folder whole
        self._real_root = os.fsencode(real)

    def respond(self, method: str, target: bytes, headers: Mapping[str, str]) -> Reply:
        """The reply to a GET or HEAD of *target*; *headers* by lower-case name."""
        try:
            parsed = parse_target(target, show_dotfiles=self.show_dotfiles)
            return self._respond(method, parsed, headers)
        except Refused as refused:
            if refused.location is None:
                return error_reply(refused.status)
            return error_reply(refused.status, headers=(("location", refused.location),))

    def _respond(self, method: str, target: Target, headers: Mapping[str, str]) -> Reply:
        file, info = self._open(target.segments)
        if file is not None and target.slash and target.segments:
            file.close()  # /poem.txt/ names a folder, and poem.txt is none
            raise Refused(404)
        if file is not None:
            name = target.segments[-1] if target.segments else b""
            return self._file_reply(method, file, info, name, headers)
        if not target.slash and target.segments:
            raise Refused(HTTPStatus.MOVED_PERMANENTLY, href(target.segments, slash=True))
        try:
            file, info = self._open((*target.segments, self.index))
        except Refused:
            file = None
        if file is not None:
            return self._file_reply(method, file, info, self.index, headers)
        if not self.listing:
            raise Refused(403)
        return self._listing(target.segments)

    def _inside(self, path: bytes) -> bytes:
        """*path*'s real location, if serving it is allowed; else Refused(404).

        Without --follow-symlinks the real location must lie under the real root, and
        when dotfiles are hidden none of its parts below the root may be a dotfile (a
        symlink ``public -> .git`` does not reveal ``.git``).
        """
        if self.follow_symlinks:
            return path
        real = os.path.realpath(path)
        root = self._real_root
        if real != root:
            prefix = root if root.endswith(b"/") else root + b"/"
            if not real.startswith(prefix):
                raise Refused(404)
            if not self.show_dotfiles and any(
                part.startswith(b".") for part in real[len(prefix) :].split(b"/")
            ):
                raise Refused(404)
        return real

    def _open(self, segments: tuple[bytes, ...]) -> tuple[io.FileIO | None, os.stat_result]:
        """Open what *segments* name under the root: a file (open) or a folder (None)."""
        path = os.path.join(self._real_root, *segments)
        real = self._inside(path)
        flags = _OPEN_FLAGS if self.follow_symlinks else _OPEN_FLAGS | os.O_NOFOLLOW
        try:
            fd = os.open(real, flags)
        except PermissionError:
            raise Refused(403) from None
        except OSError:
            # Missing, a symlink swapped in since the check (ELOOP), a name too long.
            raise Refused(404) from None
        try:
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(info.st_mode):
            return io.FileIO(fd, "rb", closefd=True), info
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            return None, info
        raise Refused(404)  # FIFOs, sockets, devices: never served

    def _file_reply(
        self,
        method: str,
        file: io.FileIO,
        info: os.stat_result,
        name: bytes,
        headers: Mapping[str, str],
    ) -> Reply:
        try:
            return self._file_reply_or_refuse(method, file, info, name, headers)
        except BaseException:
            file.close()
            raise

    def _file_reply_or_refuse(
        self,
        method: str,
        file: io.FileIO,
        info: os.stat_result,
        name: bytes,
        headers: Mapping[str, str],
    ) -> Reply:
        size = info.st_size
        etag = etag_of(info)
        modified = http_date(info.st_mtime)
        validators = [("etag", etag), ("last-modified", modified)]
        if _not_modified(headers, etag, info.st_mtime):
            file.close()
            return Reply(HTTPStatus.NOT_MODIFIED, validators)
        kind = content_type(name)
        common = [
            *validators,
            ("accept-ranges", "bytes"),
            ("x-content-type-options", "nosniff"),
        ]
        ranges = None
        if method == "GET" and "range" in headers and _if_range_holds(headers, etag, modified):
            ranges = parse_ranges(headers["range"], size)
        if ranges is None:
            headers_ok = [*common, ("content-type", kind), ("content-length", str(size))]
            if size > SMALL_FILE:
                return Reply(HTTPStatus.OK, headers_ok, [FileSlice(file, 0, size)], file)
            # One write with the head costs less than a sendfile after it.
            data = os.pread(file.fileno(), size, 0)
            file.close()
            if len(data) != size:
                raise Refused(404)  # it shrank meanwhile: the next request sees it whole
            return Reply(HTTPStatus.OK, headers_ok, [data] if data else [])
        if not ranges:
            file.close()
            return error_reply(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                headers=(("content-range", f"bytes */{size}"),),
            )
        if len(ranges) == 1:
            start, end = ranges[0]
            return Reply(
                HTTPStatus.PARTIAL_CONTENT,
                [
                    *common,
                    ("content-type", kind),
                    ("content-range", f"bytes {start}-{end}/{size}"),
                    ("content-length", str(end - start + 1)),
                ],
                [FileSlice(file, start, end - start + 1)],
                file,
            )
        boundary = secrets.token_hex(12)
        body: list[bytes | FileSlice] = []
        for start, end in ranges:
            body.append(
                f"\r\n--{boundary}\r\ncontent-type: {kind}\r\n"
                f"content-range: bytes {start}-{end}/{size}\r\n\r\n".encode("latin-1")
            )
            body.append(FileSlice(file, start, end - start + 1))
        body.append(f"\r\n--{boundary}--\r\n".encode("latin-1"))
        reply = Reply(
            HTTPStatus.PARTIAL_CONTENT,
            [*common, ("content-type", f"multipart/byteranges; boundary={boundary}")],
            body,
            file,
        )
        reply.headers.append(("content-length", str(reply.length)))
        return reply

    def _listing(self, segments: tuple[bytes, ...]) -> Reply:
        folder = os.path.join(self._real_root, *segments)
        entries: list[tuple[bytes, bool]] = []
        try:
            with os.scandir(folder) as scan:
                for entry in scan:
                    name = entry.name
                    if (name.startswith(b".") and not self.show_dotfiles) or b"\\" in name:
                        continue  # hidden, or a name no request may carry (a backslash)
                    try:
                        if entry.is_symlink():
                            self._inside(entry.path)  # hide what leads out of the root
                        is_folder = entry.is_dir()
                        if not (is_folder or entry.is_file()):
                            continue  # FIFOs, devices, broken links: never served
                    except (Refused, OSError):
                        continue
                    entries.append((name, is_folder))
        except PermissionError:
            raise Refused(403) from None
        except OSError:
            raise Refused(404) from None
        entries.sort()
        title = html.escape(urllib.parse.unquote(href(segments, slash=True)))
        lines = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>Index of {title}</title></head>",
            f"<body><h1>Index of {title}</h1><ul>",
        ]
        if segments:
            lines.append('<li><a href="../">../</a></li>')
        for name, is_folder in entries:
            link = urllib.parse.quote(name, safe="") + ("/" if is_folder else "")
            shown = html.escape(name.decode("utf-8", "replace")) + ("/" if is_folder else "")
            lines.append(f'<li><a href="{link}">{shown}</a></li>')
        lines.append("</ul></body></html>\n")
        body = "\n".join(lines).encode("utf-8")
        return Reply(
            HTTPStatus.OK,
            [
                ("content-type", "text/html; charset=utf-8"),
                ("content-length", str(len(body))),
                ("cache-control", "no-cache"),
                ("x-content-type-options", "nosniff"),
            ],
            [body],
        )


def _not_modified(headers: Mapping[str, str], etag: str, mtime: float) -> bool:
    """Whether the client's copy is current (RFC 9110 §13.2.2: If-None-Match wins)."""
    if "if-none-match" in headers:
        return etag_listed(headers["if-none-match"], etag)
    since = headers.get("if-modified-since")
    if since is None:
        return False
    when = parse_http_date(since)
    # A date later than now is invalid (RFC 9110 §13.1.3): the client gets the file.
    return when is not None and int(mtime) <= when <= time.time()


def _if_range_holds(headers: Mapping[str, str], etag: str, modified: str) -> bool:
    """Whether the Range header applies: no If-Range, or it names the file as it is."""
    condition = headers.get("if-range")
    if condition is None:
        return True
    condition = condition.strip()
    if condition.startswith(('"', "W/")):
        return condition == etag  # a strong comparison: a weak tag never matches
    when = parse_http_date(condition)
    return when is not None and when == parse_http_date(modified)
