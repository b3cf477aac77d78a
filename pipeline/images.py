"""Safe image loading: confined paths, opt-in URLs to global addresses only, byte, format and pixel
limits, and content-addressed snapshots.

Local files are opened relative to the feed folder, one path component at a time with O_NOFOLLOW
(a link that leads out of the folder, or one swapped in while we look, is refused), and only
regular files are read (O_NONBLOCK: a named pipe cannot hold the reader), at most max+1 bytes.

URLs (only with allow_image_urls): every address the host name resolves to must be global (or in
url_allow_networks); the connection goes to the checked address, not to the name again (no DNS
rebinding); every redirect is checked the same way; one deadline covers the whole fetch, whatever
the server trickles; the answer must say it is an image. A refusal names the rule; it never holds
text from the remote side.

At ingest the verified bytes are copied into an ImageStore under their SHA-256, and the product
points at that copy: inference reads exactly what ingest verified, and checks the digest again.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from pipeline.errors import UserError
from pipeline.records import Limits

# formats Pillow may open; anything else is refused before a decoder runs
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
MAX_REF_CHARS = 4096  # an image cell: a path or URL
_SNAPSHOT = re.compile(r"^[0-9a-f]{64}$")
_DNS = ThreadPoolExecutor(4, thread_name_prefix="shapstack-dns")


class ImageError(UserError):
    """An image reference that cannot be used. code: the rule (a reject's code); str: the reason."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code


def is_url(ref: str) -> bool:
    return ref.lower().startswith(("http://", "https://"))


def resolve_image_ref(ref: str, root: Path, limits: Limits) -> str:
    """Turn a feed's image cell into a reference: an absolute path inside root, or a URL."""
    if len(ref) > MAX_REF_CHARS:
        raise ImageError("image_ref_too_long", f"image reference longer than {MAX_REF_CHARS} characters")
    if is_url(ref):
        if not limits.allow_image_urls:
            raise ImageError("url_not_allowed", "image URL not allowed (set allow_image_urls)")
        return ref
    if "://" in ref:
        raise ImageError("url_scheme", "unsupported image URL scheme (http and https only)")
    p = Path(ref)
    if p.is_absolute():
        raise ImageError("image_path_absolute", "image path is absolute (must be relative to the feed folder)")
    root = root.resolve()
    full = (root / p).resolve()
    if not full.is_relative_to(root):
        raise ImageError("image_path_escapes", "image path escapes the feed folder")
    return str(full)


# ---------------------------------------------------------------------------------------- files

def _read_fd(fd: int, limit: int) -> bytes:
    """At most limit+1 bytes of an open regular file (the caller refuses more than limit)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("image_not_regular_file", "image is not a regular file")
    if st.st_size > limit:
        raise ImageError("image_too_large", f"image file over {limit} bytes")
    chunks, n = [], 0
    while n <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - n))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    if n > limit:  # grew while we read
        raise ImageError("image_too_large", f"image file over {limit} bytes")
    return b"".join(chunks)


_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)


def _open_error(exc: OSError) -> ImageError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageError("image_not_found", "image file not found")
    if exc.errno == errno.ELOOP:
        return ImageError("image_link", "image path is a link changed after it was checked")
    return ImageError("image_unreadable", f"image file unreadable: {os.strerror(exc.errno or 0)}")


def read_file_within(path: str | Path, root: Path, limit: int) -> bytes:
    """The bytes of path, which must lie inside root, opened component by component without
    following a link (resolve_image_ref resolved the links that stay inside root already)."""
    root = Path(root).resolve()
    parts = Path(path).relative_to(root).parts
    if not parts:
        raise ImageError("image_not_regular_file", "image is not a regular file")
    try:
        fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise _open_error(exc) from None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError as exc:
        raise _open_error(exc) from None
    finally:
        os.close(fd)
    return _read_and_close(leaf, limit)


def read_file(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file at an absolute path; the last component must not be a link."""
    try:
        fd = os.open(path, _FILE_FLAGS)
    except OSError as exc:
        raise _open_error(exc) from None
    return _read_and_close(fd, limit)


def _read_and_close(fd: int, limit: int) -> bytes:
    try:
        return _read_fd(fd, limit)
    except OSError as exc:
        raise _open_error(exc) from None
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- URLs

def address_allowed(addr: str, extra_networks: tuple[str, ...] = ()) -> bool:
    """Whether a fetch may connect to addr: a global unicast address, or one in extra_networks."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(n, strict=False) for n in extra_networks):
        return True
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise ImageError("url_deadline", "image URL fetch over its deadline (url_timeout_s)")
        return left


def _resolve(host: str, port: int, deadline: _Deadline) -> list[str]:
    future = _DNS.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=deadline.left())
    except FutureTimeout:
        raise ImageError("url_deadline", "image URL fetch over its deadline (url_timeout_s)") from None
    except (OSError, UnicodeError):
        raise ImageError("url_unresolved", "image URL host does not resolve") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _check_url(url: str, limits: Limits, deadline: _Deadline) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) of url, or the rule it breaks."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImageError("url_invalid", "image URL is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError("url_scheme", "unsupported image URL scheme (http and https only)")
    if parts.username is not None or parts.password is not None:
        raise ImageError("url_credentials", "image URL holds credentials")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ImageError("url_invalid", "image URL has no host")
    if limits.url_allowed_hosts and host not in limits.url_allowed_hosts:
        raise ImageError("url_host_not_allowed", "image URL host is not in url_allowed_hosts")
    port = port or (443 if scheme == "https" else 80)
    addresses = _resolve(host, port, deadline)
    if not addresses:
        raise ImageError("url_unresolved", "image URL host does not resolve")
    if not all(address_allowed(a, limits.url_allow_networks) for a in addresses):
        raise ImageError("url_not_global", "image URL host resolves to a non-global address "
                                           "(loopback, private, link-local or reserved)")
    return scheme, host, port, addresses[0]


def fetch_url(url: str, limits: Limits) -> bytes:
    """GET an image URL under the rules in the module docstring; at most max_image_bytes."""
    if not limits.allow_image_urls:
        raise ImageError("url_not_allowed", "image URL not allowed (set allow_image_urls)")
    deadline = _Deadline(limits.url_timeout_s)
    for _hop in range(limits.url_max_redirects + 1):
        scheme, host, port, address = _check_url(url, limits, deadline)
        kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = kind(host, port, address, timeout=deadline.left())
        # the deadline holds even against a server that trickles a byte at a time
        watchdog = threading.Timer(deadline.left(), _cut, args=(conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            target = urlsplit(url)._replace(scheme="", netloc="", fragment="").geturl() or "/"
            conn.request("GET", target, headers={"Host": host if port in (80, 443) else f"{host}:{port}",
                                                 "Accept": "image/*", "User-Agent": "shapstack"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise ImageError("url_http_status", f"image URL answered HTTP {resp.status} without a location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise ImageError("url_http_status", f"image URL answered HTTP {resp.status}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise ImageError("url_content_type", "image URL did not answer with an image content type")
            length = resp.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > limits.max_image_bytes:
                raise ImageError("image_too_large", f"image over {limits.max_image_bytes} bytes")
            chunks, n = [], 0
            while n <= limits.max_image_bytes:
                if conn.sock is not None:
                    conn.sock.settimeout(deadline.left())
                chunk = resp.read1(min(1 << 16, limits.max_image_bytes + 1 - n))
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            deadline.left()
            if n > limits.max_image_bytes:
                raise ImageError("image_too_large", f"image over {limits.max_image_bytes} bytes")
            return b"".join(chunks)
        except ImageError:
            raise
        except (OSError, http.client.HTTPException, ValueError):
            deadline.left()  # a read cut by the watchdog is the deadline's doing
            raise ImageError("url_unreadable", "image URL could not be fetched (connection or protocol error)") from None
        finally:
            watchdog.cancel()
            conn.close()
    raise ImageError("url_redirects", f"image URL redirected more than {limits.url_max_redirects} times")


def _cut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ------------------------------------------------------------------------------- decode, store

def decode_image(data: bytes, limits: Limits) -> tuple[Image.Image, str]:
    """(RGB image, format) of data: whitelisted formats only, pixels counted before they are decoded."""
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("image_format", f"not an image of an allowed format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise ImageError("image_pixels", f"image over the {limits.max_image_pixels} pixel limit") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageError("image_corrupt", f"image corrupt or unsupported: {type(exc).__name__}") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise ImageError("image_pixels", f"image has {w}x{h} pixels, over the {limits.max_image_pixels} limit")
    try:
        im.load()
        return im.convert("RGB"), im.format
    except Exception as exc:  # noqa: BLE001
        raise ImageError("image_corrupt", f"image corrupt or unsupported: {type(exc).__name__}") from None


class ImageStore:
    """Content-addressed copies of verified images: <root>/<2 hex>/<sha256>.<ext>, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def put(self, data: bytes, fmt: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / f"{digest}.{EXTENSIONS.get(fmt, 'img')}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        return str(path)


def is_snapshot(ref: str) -> bool:
    p = Path(ref)
    return bool(_SNAPSHOT.match(p.stem)) and p.parent.name == p.stem[:2]


def read_image_bytes(ref: str, limits: Limits, root: Path | None = None) -> bytes:
    """The bytes of an image reference: a URL, a path inside root, or an absolute path (a snapshot,
    whose digest is checked against its name)."""
    if is_url(ref):
        return fetch_url(ref, limits)
    if root is not None:
        return read_file_within(ref, root, limits.max_image_bytes)
    data = read_file(ref, limits.max_image_bytes)
    if is_snapshot(ref) and hashlib.sha256(data).hexdigest() != Path(ref).stem:
        raise ImageError("image_snapshot_changed", "image snapshot does not match its digest (changed after ingest)")
    return data


def load_image(ref: str, limits: Limits = Limits()) -> Image.Image:
    """An image as RGB for a model; raises ImageError (never returns a placeholder)."""
    return decode_image(read_image_bytes(ref, limits), limits)[0]


def verify_image(ref: str, root: Path, limits: Limits, store: ImageStore | None) -> tuple[str, str]:
    """Read and fully decode an image once; (reference to store, content digest).

    With a store the reference is the snapshot of the verified bytes, else ref itself.
    """
    data = read_image_bytes(ref, limits, None if is_url(ref) else root)
    _, fmt = decode_image(data, limits)
    digest = hashlib.sha256(data).hexdigest()
    return (store.put(data, fmt) if store is not None else ref), digest
