"""A check of an LMDB environment's data file before it is mapped: LMDB reads its pages through a memory map,
so a file cut short (a full disk, a copy interrupted, a crash of the filesystem) kills the process with
SIGBUS at the first page past its end instead of returning an error.

Promises: ``damage(directory)`` reads only the two meta pages (plain reads, never a mapping) and returns why
the environment cannot be opened safely (too short for the pages its newest meta page says are in use, or
no valid meta page), or ``None`` for an environment that is sound by that measure or does not exist yet.
"""

from __future__ import annotations

import os
import struct

# lmdb.h / mdb.c, version 0.9: a page header (pgno u64, pad u16, flags u16, lower/upper u16) then MDB_meta:
# magic u32, version u32, address u64, mapsize u64, two MDB_db of 48 bytes (the first's md_pad holds the
# page size), last_pg u64, txnid u64.
_META = struct.Struct("<16xIIQQ96xQQ")
_PSIZE = struct.Struct("<40xI")
_MAGIC = 0xBEEFC0DE
_DATA_FILE = "data.mdb"


def damage(directory: str) -> str | None:
    """Why the LMDB environment in ``directory`` would fault when mapped, or ``None``."""
    path = os.path.join(directory, _DATA_FILE)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                return None  # created but never written: LMDB initializes it
            first = file.read(4096)
            if len(first) < _META.size:
                return f"{path} is {size} bytes, shorter than one LMDB meta page"
            (page_bytes,) = _PSIZE.unpack_from(first)
            if page_bytes < 512 or page_bytes & (page_bytes - 1):
                return f"{path} has no valid LMDB meta page"
            file.seek(page_bytes)
            second = file.read(_META.size)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    metas = [_META.unpack_from(page) for page in (first, second) if len(page) >= _META.size]
    valid = [(txnid, last_page) for magic, _, _, _, last_page, txnid in metas if magic == _MAGIC]
    if not valid:
        return f"{path} has no valid LMDB meta page"
    _, last_page = max(valid)
    need = (last_page + 1) * page_bytes
    if size < need:
        return f"{path} is truncated: {size} bytes, its pages in use need {need}"
    return None
