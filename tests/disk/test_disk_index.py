"""The LMDB index: records round-trip, changes apply in ticket order, batches commit together, a failed batch
is retried, and LMDB's failures come back typed."""

from __future__ import annotations

import dataclasses
import errno
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lmdb
import pytest

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier
from kvtier.disk.format import CODEC_NONE, CODEC_ZSTD
from kvtier.disk.index import _ENTRY, DiskIndex, Forget, IndexEntry, OpenRegion, RegionState, SealRegion
from kvtier.errors import DiskError, DiskFullError, IndexDamagedError, IndexFullError

if TYPE_CHECKING:
    from conftest import DiskKit


def entry(region: int, offset: int) -> IndexEntry:
    return IndexEntry(path=region % 2, region=region, offset=offset, stored_len=100, raw_len=200, codec=1,
                      planes=2, header_checksum=2**64 - 1, payload_checksum=12345)


def key(i: int) -> bytes:
    return bytes([i]) * 16


def test_changes_apply_in_ticket_order_and_survive_a_reopen(tmp_path: Path) -> None:
    index = DiskIndex(str(tmp_path), 1 << 20)
    assert index.read_meta() is None
    index.reset({"format_version": 1})
    index.enqueue(OpenRegion(3))
    index.enqueue(SealRegion(3, seq=7, entries=((key(1), entry(3, 0)), (key(2), entry(3, 8192)))))
    index.enqueue(OpenRegion(5, dropped=(key(2),)))  # key 2 re-put below: order decides
    index.enqueue(SealRegion(5, seq=8, entries=((key(2), entry(5, 4096)),)))
    last = index.enqueue(Forget(regions=(9,), keys=(key(1),)))
    index.wait(last)
    index.close()
    index = DiskIndex(str(tmp_path), 1 << 20)
    regions, entries = index.load()
    assert regions == {3: (RegionState.SEALED, 7), 5: (RegionState.SEALED, 8)}
    assert entries == {key(2): entry(5, 4096)}
    assert index.read_meta() == {"format_version": 1}
    index.close()


def test_concurrent_waiters_share_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = DiskIndex(str(tmp_path), 1 << 20)
    commits: list[int] = []
    commit = index._commit
    gate = threading.Event()

    def slow_commit(changes: object) -> None:
        gate.wait(5)
        batch = list(changes)  # type: ignore[call-overload]
        commits.append(len(batch))
        commit(batch)

    monkeypatch.setattr(index, "_commit", slow_commit)
    tickets = [index.enqueue(OpenRegion(i)) for i in range(8)]
    threads = [threading.Thread(target=index.wait, args=(t,)) for t in tickets]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join(5)
    assert sum(commits) == 8 and len(commits) <= 2  # the first waiter commits all eight (or a straggler)
    index.close()


def test_a_failed_batch_raises_for_its_waiters_and_is_retried(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    index = DiskIndex(str(tmp_path), 1 << 20)

    def broken(changes: object) -> None:
        raise DiskError("the disk index failed: injected")

    ticket = index.enqueue(OpenRegion(1))
    withdrawn = index.enqueue(OpenRegion(3))
    monkeypatch.setattr(index, "_commit", broken)
    with pytest.raises(DiskError, match="injected"):
        index.wait(ticket)
    monkeypatch.undo()
    assert index.withdraw(withdrawn)
    index.wait(index.enqueue(OpenRegion(2)))  # the failed change is committed with the next, in order
    assert index.load()[0] == {1: (RegionState.OPEN, 0), 2: (RegionState.OPEN, 0)}
    assert not index.withdraw(ticket)  # committed: nothing to take back
    index.wait(ticket)  # done, does not raise the old failure
    index.close()


def test_lmdb_failures_are_typed(tmp_path: Path) -> None:
    index = DiskIndex(str(tmp_path), 1 << 20)
    assert type(index._error(lmdb.Error("mdb_txn_commit", errno.ENOSPC), "cannot be written")) is DiskFullError
    assert type(index._error(lmdb.MapFullError("mdb_put", -30792), "cannot be written")) is IndexFullError
    assert type(index._error(lmdb.CorruptedError("mdb_get", -30796), "cannot be read")) is IndexDamagedError
    if shutil.disk_usage(tmp_path).free > 1 << 30:  # an EIO with room to spare is an I/O error, not a full disk
        assert type(index._error(lmdb.Error("mdb_txn_commit", errno.EIO), "cannot be written")) is DiskError
    index.close()


@pytest.mark.parametrize("field", ["codec", "planes", "raw_len"])
def test_an_index_record_that_disagrees_with_its_verified_header_is_a_miss(
        disk_config: Callable[..., DiskConfig], kit: DiskKit, field: str) -> None:
    """LMDB's pages carry no checksum: a damaged field of a block's index record (here a zstd entry's byte
    planes, codec or raw length) must make the read a counted miss, not decode verified bytes into others."""
    config = disk_config(codec="zstd", reinsert_hits=0)
    block = kit.payload(1)
    block[: kit.block // 2] = 0  # compressible: stored with zstd over the layout's byte planes
    with DiskTier(config, kit.layout) as tier:
        assert tier.offer(kit.key(1), block)
        tier.flush()
    env = lmdb.open(str(Path(config.paths[0]) / "kvtier-index"), max_dbs=3, subdir=True)
    with env.begin(write=True) as txn:
        entries = env.open_db(b"entries", txn=txn)
        record = IndexEntry(*_ENTRY.unpack(txn.get(kit.key(1), db=entries)))
        assert (record.codec, record.planes) == (CODEC_ZSTD, 2)
        damaged = dataclasses.replace(record, **{field: {"codec": CODEC_NONE, "planes": 1,
                                                         "raw_len": record.raw_len // 2}[field]})
        txn.put(kit.key(1), _ENTRY.pack(*dataclasses.astuple(damaged)), db=entries)
    env.close()
    with DiskTier(config, kit.layout) as tier:
        assert kit.read(tier, 1) is None
        assert tier.stats().checksum_failures == 1


def test_close_waits_for_a_transaction_in_flight(tmp_path: Path) -> None:
    """Closing an LMDB environment under an open transaction (an epoch written by another thread) is
    undefined: a crash of the process, not an error."""
    index = DiskIndex(str(tmp_path), 1 << 20)
    with index._read():
        closing = threading.Thread(target=index.close)
        closing.start()
        closing.join(0.2)
        assert closing.is_alive()
    closing.join(10)
    assert not closing.is_alive()
    with pytest.raises(DiskError):
        index.read_epochs()
