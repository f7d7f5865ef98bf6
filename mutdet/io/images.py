"""Source images, verified when read: a truncated or corrupt file is an error naming it, never grey pixels.

OpenCV decodes the pixels (``cv2.imread``: BGR, EXIF orientation applied), but its libjpeg fills a
truncated JPEG with grey after a warning on stderr, and the caller cannot tell. So JPEG and PNG files
are first walked through their structure, without decoding pixels:

* JPEG: the marker segments from SOI, each scan's entropy-coded data up to its next marker, and so
  on until EOI. Reaching the end of the file before EOI means the file is truncated.
* PNG: the signature, then every chunk (length, type, data, CRC-32, which must match) until a whole
  IEND chunk. Reaching the end before that means the file is truncated; a CRC mismatch, corrupt.

Bytes after EOI / IEND are allowed (decoders ignore them, and some writers append data). The walk
also gives the image size (SOF / IHDR) and the EXIF orientation, so :func:`image_size` knows the
decoded size without decoding (evaluation uses it to apply the same ground-truth rules as tiling).
Other formats (TIFF, BMP, WebP, ...) are not walked: they are decoded, and a file OpenCV cannot
decode is an error. Every failure is an :class:`~mutdet.io.annotations.AnnotationError` naming the
file, so the ``on_bad_object`` policy treats a truncated image like an unreadable one.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np

from mutdet.io.annotations import AnnotationError

_JPEG_SOI = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI and EOI are handled apart).
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_EXIF_ORIENTATION = 0x0112


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


def _walk_jpeg(data: bytes) -> tuple[int, int, bytes | None]:
    """Width, height and the EXIF payload (APP1) of a complete JPEG; raises at the first problem."""
    n, pos = len(data), 2
    size, exif = None, None
    while True:
        if pos + 2 > n:
            raise _Truncated("the file ends before the JPEG end-of-image marker")
        if data[pos] != 0xFF:
            raise _Corrupt(f"expected a JPEG marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        pos += 2
        if marker == 0xD9:  # EOI
            break
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            raise _Truncated(f"the file ends inside JPEG segment 0x{marker:02x}")
        end = pos + int.from_bytes(data[pos:pos + 2], "big")
        if end < pos + 2:
            raise _Corrupt(f"JPEG segment 0x{marker:02x} at byte {pos - 2} has a length below 2")
        if end > n:
            raise _Truncated(f"the file ends inside JPEG segment 0x{marker:02x}")
        if marker in _JPEG_SOF and size is None and end - pos >= 7:
            size = (int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 3:pos + 5], "big"))
        elif marker == 0xE1 and exif is None and data.startswith(b"Exif\x00\x00", pos + 2):
            exif = data[pos + 2:end]
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    raise _Truncated("the file ends inside JPEG scan data (no end-of-image marker)")
                follower = data[pos + 1]
                if follower == 0x00 or 0xD0 <= follower <= 0xD7:  # stuffed 0xFF byte or restart marker
                    pos += 2
                elif follower == 0xFF:  # fill byte
                    pos += 1
                else:
                    break
    if size is None:
        raise _Corrupt("JPEG without a start-of-frame segment (no image size)")
    return size[0], size[1], exif


def _walk_png(data: bytes) -> tuple[int, int, bytes | None]:
    """Width, height and the EXIF payload (eXIf) of a complete PNG; raises at the first problem."""
    n, pos = len(data), len(_PNG_SIGNATURE)
    view = memoryview(data)
    size, exif = None, None
    while True:
        if pos + 8 > n:
            raise _Truncated("the file ends before the PNG IEND chunk")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > n:
            raise _Truncated(f"the file ends inside PNG chunk {kind!r}")
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != int.from_bytes(data[pos + 8 + length:end], "big"):
            raise _Corrupt(f"CRC mismatch in PNG chunk {kind!r} at byte {pos}")
        if kind == b"IHDR" and length >= 8:
            size = (int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big"))
        elif kind == b"eXIf" and exif is None:
            exif = data[pos + 8:pos + 8 + length]
        elif kind == b"IEND":
            break
        pos = end
    if size is None:
        raise _Corrupt("PNG without an IHDR chunk (no image size)")
    return size[0], size[1], exif


def _oriented(width: int, height: int, exif: bytes | None) -> tuple[int, int]:
    """Size after OpenCV applies the EXIF orientation (5-8 turn the image by 90 degrees)."""
    if exif is not None:
        from PIL import Image  # only for files with EXIF: every tile / evaluate command imports this module

        try:
            orientation = Image.Exif()
            orientation.load(exif)
            if orientation.get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
                return height, width
        except Exception:  # noqa: BLE001 - unreadable EXIF: OpenCV ignores it too
            pass
    return width, height


def check_image(path: str | Path) -> tuple[int, int] | None:
    """Verify that a JPEG or PNG file is complete, without decoding it.

    Returns:
        ``(width, height)`` as :func:`read_image` will decode it, or ``None`` for other formats (not
        checked here; :func:`read_image` decodes them).
    Raises:
        AnnotationError: naming the file, when it cannot be read, is truncated or is corrupt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(path, None, f"cannot read image: {exc}") from None
    if data.startswith(_JPEG_SOI):
        walk = _walk_jpeg
    elif data.startswith(_PNG_SIGNATURE):
        walk = _walk_png
    else:
        return None
    try:
        return _oriented(*walk(data))
    except _Truncated as exc:
        raise AnnotationError(path, None, f"truncated image: {exc}") from None
    except _Corrupt as exc:
        raise AnnotationError(path, None, f"corrupt image: {exc}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as ``(H, W, 3)`` uint8 BGR, after :func:`check_image`.

    Raises:
        AnnotationError: naming the file, when it is truncated, corrupt or not a decodable image.
    """
    size = check_image(path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise AnnotationError(path, None, "unreadable image (not a decodable image file)")
    if size is not None and (image.shape[1], image.shape[0]) != size:
        raise AnnotationError(path, None, f"decoded as {image.shape[1]}x{image.shape[0]} pixels but its header "
                                          f"says {size[0]}x{size[1]}")
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a verified image as :func:`read_image` decodes it (JPEG and PNG without decoding)."""
    size = check_image(path)
    if size is None:
        height, width = read_image(path).shape[:2]
        size = (width, height)
    return size
