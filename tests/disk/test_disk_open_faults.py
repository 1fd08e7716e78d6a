"""Faults found when the disk tier opens: a truncated LMDB index (which a mapping would turn into SIGBUS) and
a filesystem too small for the data file (a real 8 MiB tmpfs in a private mount namespace). The first open
of each runs in a child process, so that a SIGBUS fails the test instead of killing it. An index rebuilt
keeps the key epochs from the epoch file, or starts empty (its old entries erased) where there is none."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import kvtier.disk.tier as tier_module
from kvtier.config import DiskConfig
from kvtier.disk import DiskTier
from kvtier.disk.epoch_file import read_epoch_file
from kvtier.errors import DiskError

if TYPE_CHECKING:
    from conftest import DiskKit

OPEN = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO)
    from kvtier.config import DiskConfig
    from kvtier.disk import DiskTier
    from kvtier.errors import DiskError
    from kvtier.layout import KVLayout
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=16)
    config = DiskConfig(paths=(sys.argv[1],), capacity_bytes=sys.argv[2], region_bytes="256KiB",
                        wipe_incompatible=sys.argv[3] == "wipe")
    try:
        with DiskTier(config, layout) as tier:
            print("OPENED", tier.stats().used_blocks, flush=True)
    except DiskError as exc:
        print("REFUSED", exc, flush=True)
""")


def open_in_child(path: Path | str, capacity: str = "1MiB", wipe: bool = False,
                  prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", OPEN, str(path), capacity, "wipe" if wipe else "keep"],
                          capture_output=True, text=True, timeout=300)


def test_a_truncated_index_is_rebuilt_from_the_data_files(tmp_path: Path, kit: DiskKit) -> None:
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        kit.fill(tier, range(3 * kit.per_region))
        tier.flush()
    data = tmp_path / "kvtier-index" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    reopened = open_in_child(tmp_path)
    assert reopened.returncode == 0, reopened.stderr  # SIGBUS would be -7
    assert f"OPENED {3 * kit.per_region}" in reopened.stdout, reopened.stdout + reopened.stderr
    assert "damaged" in reopened.stderr and "rebuilt" in reopened.stderr  # logged
    with DiskTier(config, kit.layout) as tier:  # the blocks read back, verified, and the tier goes on
        kit.assert_holds(tier, range(3 * kit.per_region))
        kit.fill(tier, range(100, 100 + 2 * kit.per_region))  # wraps: the rebuilt regions are evicted in turn
        tier.flush()
        kit.assert_holds(tier, range(100, 100 + 2 * kit.per_region))


def test_a_start_refused_for_lack_of_space_leaves_no_data_file(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a small filesystem")
    mount = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=8m tmpfs {tmp_path} && exec "$@"', "sh")
    probe = subprocess.run([*mount, "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {probe.stderr.decode().strip()}")
    script = textwrap.dedent(f"""
        set -e
        {sys.executable} -c "$OPEN" {tmp_path}/disk 64MiB keep
        ls -A {tmp_path}/disk
        df -k --output=used {tmp_path} | tail -1
    """)
    done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=8m tmpfs {tmp_path} && {script}"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OPEN": OPEN})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "MiB free" in lines[0] and "disk.capacity_bytes" in lines[0]
    assert "kvtier-data.bin" not in lines[1:-1]
    assert int(lines[-1]) < 1024  # KiB used: the partial preallocation went back


def test_an_index_lmdb_reports_corrupt_at_open_is_rebuilt(tmp_path: Path, kit: DiskKit,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        kit.fill(tier, range(2 * kit.per_region))
        tier.flush()
    with (tmp_path / "kvtier-index" / "data.mdb").open("r+b") as file:  # the first page after the metas zeroed:
        file.seek(2 * 4096)  # LMDB opens the environment, then finds a page of the wrong type when it is read
        file.write(bytes(4096))
    with caplog.at_level(logging.ERROR, logger="kvtier.disk.tier"), DiskTier(config, kit.layout) as tier:
        kit.assert_holds(tier, range(2 * kit.per_region))
        assert tier.stats().admitting
    assert any("damaged" in r.message and "rebuilding" in r.message for r in caplog.records)


def test_any_one_index_page_zeroed_is_rebuilt_never_an_abort(tmp_path: Path, kit: DiskKit) -> None:
    """LMDB aborts the process (``Assertion 'IS_LEAF(mp)' failed``) on some damaged pages instead of returning
    an error: every page of the index is zeroed in turn, and each open, in a child, must rebuild or read on."""
    source = tmp_path / "source"
    config = DiskConfig(paths=(str(source),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        kit.fill(tier, range(2 * kit.per_region))
        tier.flush()
    pristine = (source / "kvtier-index" / "data.mdb").read_bytes()
    for page in range(2, len(pristine) // 4096):  # the two meta pages are the truncation test's
        copy = tmp_path / f"page-{page}"
        shutil.copytree(source, copy)
        damaged = bytearray(pristine)
        damaged[page * 4096 : (page + 1) * 4096] = bytes(4096)
        (copy / "kvtier-index" / "data.mdb").write_bytes(damaged)
        opened = open_in_child(copy)
        assert opened.returncode == 0, f"page {page}: {opened.returncode} {opened.stderr[-500:]}"  # SIGABRT: -6
        assert f"OPENED {2 * kit.per_region}" in opened.stdout, f"page {page}: {opened.stdout + opened.stderr}"
        shutil.rmtree(copy)


def _truncate_index(path: Path) -> None:
    data = path / "kvtier-index" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)


def test_a_rebuilt_index_keeps_the_key_epochs(tmp_path: Path, kit: DiskKit) -> None:
    """A rebuild finds the blocks in the data files and the epochs in the epoch file: a scope advanced before
    stays advanced, so the keys of its older epochs, whose blocks come back, are never derived again."""
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        kit.fill(tier, range(kit.per_region))
        tier.flush()
        tier.write_epoch("model", 1)
        tier.write_epoch("other", 3)
    _truncate_index(tmp_path)
    with DiskTier(config, kit.layout) as tier:
        assert tier.read_epochs() == {"model": 1, "other": 3}
        kit.assert_holds(tier, range(kit.per_region))
    with DiskTier(config, kit.layout) as tier:  # the rebuilt index holds them too
        assert tier.read_epochs() == {"model": 1, "other": 3}


@pytest.mark.parametrize("damage_file", ["missing", "garbage"])
def test_an_index_lost_with_no_epoch_record_starts_empty_for_good(tmp_path: Path, kit: DiskKit,
                                                                  damage_file: str) -> None:
    """Without a valid epoch file the epochs are unknown: a rebuild could serve an old epoch's blocks to the
    keys derived under it again, so the tier starts empty, and its old entries are erased: a later rebuild
    (the index damaged again) finds none of them."""
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        kit.fill(tier, range(kit.per_region))
        tier.flush()
        tier.write_epoch("model", 1)
    epoch_file = tmp_path / "kvtier-epochs.json"
    if damage_file == "missing":
        epoch_file.unlink()
    else:
        epoch_file.write_text('{"version": 1, "epochs": {"model": "one"}}')
    _truncate_index(tmp_path)
    for _ in range(2):
        with DiskTier(config, kit.layout) as tier:
            assert tier.read_epochs() == {} and tier.stats().used_blocks == 0
            assert all(kit.read(tier, i) is None for i in range(kit.per_region))
        _truncate_index(tmp_path)


def test_a_directory_without_an_epoch_file_gets_one_from_its_index(tmp_path: Path, kit: DiskKit) -> None:
    """A directory written before the epoch file existed: a sound index gives the file its epochs at open."""
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB", reinsert_hits=0)
    with DiskTier(config, kit.layout) as tier:
        tier.write_epoch("model", 2)
    (tmp_path / "kvtier-epochs.json").unlink()
    with DiskTier(config, kit.layout) as tier:
        assert tier.read_epochs() == {"model": 2}
    assert read_epoch_file(str(tmp_path / "kvtier-epochs.json")) == {"model": 2}


def test_an_epoch_that_cannot_be_recorded_is_a_disk_error_and_changes_nothing(
        tmp_path: Path, kit: DiskKit, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB")

    def no_space(path: str, epochs: dict[str, int]) -> None:
        raise OSError(28, "No space left on device")

    with DiskTier(config, kit.layout) as tier:
        monkeypatch.setattr(tier_module, "write_epoch_file", no_space)
        with pytest.raises(DiskError, match="key epoch"):
            tier.write_epoch("model", 1)
        assert tier.read_epochs() == {}


def test_an_epoch_file_that_cannot_be_written_at_open_is_a_disk_error(tmp_path: Path, kit: DiskKit) -> None:
    (tmp_path / "kvtier-epochs.json.tmp").mkdir()  # where the file is written first: a directory, not a file
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="1MiB", region_bytes="256KiB")
    with pytest.raises(DiskError, match="key epochs"):
        DiskTier(config, kit.layout)
