"""A check of an LMDB environment's data file before it is mapped: LMDB reads its pages through a memory map,
so a file cut short (a full disk, a copy interrupted, a crash of the filesystem) kills the process with
SIGBUS at the first page past its end instead of returning an error.

Promises: ``damage(directory)`` reads only the two meta pages (plain reads, never a mapping) and returns why
the environment cannot be opened safely (too short for the pages its newest meta page says are in use, or
no valid meta page), or ``None`` for an environment that is sound by that measure or does not exist yet.
``walk_fault(directory)`` reads every record of the environment in a child process and returns why that
child failed (LMDB aborts the process on some damaged pages, an assertion rather than an error), or
``None``: a damaged page then costs the child, never the caller.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys

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


# Read every record of every database, as ``DiskIndex.load`` will: a page LMDB cannot parse fails here first.
_WALK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=8, subdir=True)
with env.begin() as txn:
    names = [key for key, _ in txn.cursor()]
    for name in names:
        for _ in txn.cursor(env.open_db(name, txn=txn, create=False)):
            pass
"""
# A walk of millions of records takes seconds; one that takes this long is stuck, not slow.
_WALK_TIMEOUT_S = 120.0


def walk_fault(directory: str) -> str | None:
    """Why a child process reading every record of the LMDB environment in ``directory`` failed, or ``None``."""
    if not os.path.exists(os.path.join(directory, _DATA_FILE)):
        return None
    try:
        done = subprocess.run([sys.executable, "-c", _WALK, directory], capture_output=True, text=True,
                              timeout=_WALK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"reading every record of {directory} took over {_WALK_TIMEOUT_S:.0f} s"
    except OSError:
        return None  # no interpreter to run the check with (an embedded Python): the open goes on unchecked
    if done.returncode < 0:
        return f"reading every record of {directory} killed the reader ({signal.Signals(-done.returncode).name})"
    last = (done.stderr.strip().splitlines() or [""])[-1]
    # Only LMDB's own verdict counts: a child that could not start (no lmdb there, say) says nothing of the file.
    return f"reading every record of {directory} failed: {last}" if last.startswith("lmdb.") else None
