"""Crafted files the service must refuse cheaply: a decompression-bomb PNG and truncated images.

The test suite sends them (tests/test_hardening.py) and so does the soak benchmark's mix.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG that claims 50,000 x 50,000 pixels in a few KB (a decompression bomb)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = zlib.compress(b"\x00" * (width * 3 + 1) * 2, 9)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def truncated(fmt: str) -> bytes:
    """Noise saved in `fmt` (JPEG, PNG ...), cut in half."""
    buffer = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]
