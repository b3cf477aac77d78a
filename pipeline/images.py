"""Safe image loading: confined paths, opt-in URLs, byte and pixel limits."""

from __future__ import annotations

import hashlib
import io
import urllib.request
import warnings
from pathlib import Path

from PIL import Image

from pipeline.records import Limits


class ImageError(ValueError):
    """An image reference that cannot be used; the message is the reject reason."""


def is_url(ref: str) -> bool:
    return ref.lower().startswith(("http://", "https://"))


def resolve_image_ref(ref: str, root: Path, limits: Limits) -> str:
    """Turn a feed's image cell into a stored reference: an absolute path inside root, or a URL."""
    if is_url(ref):
        if not limits.allow_image_urls:
            raise ImageError("image URL not allowed (set allow_image_urls)")
        return ref
    if "://" in ref:
        raise ImageError("unsupported image URL scheme")
    p = Path(ref)
    if p.is_absolute():
        raise ImageError("image path is absolute (must be relative to the feed folder)")
    root = root.resolve()
    full = (root / p).resolve()
    if not full.is_relative_to(root):
        raise ImageError("image path escapes the feed folder")
    return str(full)


def read_image_bytes(ref: str, limits: Limits) -> bytes:
    if is_url(ref):
        if not limits.allow_image_urls:
            raise ImageError("image URL not allowed (set allow_image_urls)")
        try:
            with urllib.request.urlopen(ref, timeout=limits.url_timeout_s) as resp:  # noqa: S310 (scheme checked)
                data = resp.read(limits.max_image_bytes + 1)
        except OSError as exc:
            raise ImageError(f"image URL unreadable: {exc}") from None
    else:
        path = Path(ref)
        try:
            size = path.stat().st_size
        except OSError:
            raise ImageError("image file not found") from None
        if size > limits.max_image_bytes:
            raise ImageError(f"image file over {limits.max_image_bytes} bytes")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"image file unreadable: {exc.strerror}") from None
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image over {limits.max_image_bytes} bytes")
    return data


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode to RGB, refusing decompression bombs before the pixels are allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise ImageError(f"image has {w}x{h} pixels, over the {limits.max_image_pixels} limit")
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image is a decompression bomb") from None
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ImageError(f"image corrupt or unsupported: {type(exc).__name__}") from None
    return im.convert("RGB")


def load_image(ref: str, limits: Limits = Limits()) -> Image.Image:
    return decode_image(read_image_bytes(ref, limits), limits)


def check_image(ref: str, limits: Limits) -> str:
    """Fully decode once (catches truncated files) and return the content digest."""
    data = read_image_bytes(ref, limits)
    decode_image(data, limits)
    return hashlib.sha256(data).hexdigest()
