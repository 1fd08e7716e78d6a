"""Optional per-entry compression: zstd over a byte-plane split of the block's elements.

KV values are 16-bit floats whose high bytes (sign, exponent) repeat far more than their low bytes.
Storing all first bytes, then all second bytes ("byte planes") before zstd raised the ratio on KV-like data
here from 1.29 to 1.47.

Promises:
- ``encode`` returns the compressed bytes, or ``None`` when compression would not save at least one page
  on disk (the caller then stores the raw bytes with ``CODEC_NONE``).
- ``decode_into(stored, planes, dst)`` fills ``dst`` exactly, or returns ``False`` (never raises) when the
  bytes do not decode to ``len(dst)`` bytes. It never allocates more than ``len(dst)`` bytes for the output,
  whatever the frame declares: a frame whose header names another size is refused before decompressing.
- Safe to call from several threads at once (one zstd context per thread).
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from kvtier.disk.format import round_up

_LEVEL = 1  # level 1 is the fastest; higher levels gained little on KV and were slower than the disk


class ZstdCodec:
    """zstd at level 1 after a split into ``planes`` byte planes (the element size; 1 disables it).

    Every buffer given to ``encode`` must be a whole number of ``planes``-byte elements.
    """

    def __init__(self, planes: int) -> None:
        self.planes = planes
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        if not hasattr(self._local, "compressor"):
            self._local.compressor = zstandard.ZstdCompressor(level=_LEVEL)
            self._local.decompressor = zstandard.ZstdDecompressor()
        compressor: zstandard.ZstdCompressor = self._local.compressor
        return compressor

    def encode(self, raw: memoryview) -> bytes | None:
        data = np.frombuffer(raw, dtype=np.uint8)
        if self.planes > 1:
            data = np.ascontiguousarray(data.reshape(-1, self.planes).T)
        stored: bytes = self._compressor().compress(data.data)
        return stored if round_up(len(stored)) < round_up(len(raw)) else None

    def decode_into(self, stored: memoryview, planes: int, dst: memoryview) -> bool:
        self._compressor()
        try:
            # A frame's header may declare any size (64 GiB in 65 bytes) and the decompressor allocates what it
            # declares: refuse another size first; a frame without one is capped at len(dst) by max_output_size.
            declared = zstandard.frame_content_size(stored)
            if declared != len(dst) and declared != -1:  # -1: the frame does not say
                return False
            raw = self._local.decompressor.decompress(stored, max_output_size=len(dst))
        except Exception:  # any failure to decode (ZstdError, MemoryError...) is a bad value, never an error
            return False
        if len(raw) != len(dst) or planes < 1 or len(raw) % planes:
            return False
        out = np.frombuffer(dst, dtype=np.uint8)
        if planes == 1:
            out[:] = np.frombuffer(raw, dtype=np.uint8)
        else:
            out.reshape(-1, planes)[:] = np.frombuffer(raw, dtype=np.uint8).reshape(planes, -1).T
        return True
