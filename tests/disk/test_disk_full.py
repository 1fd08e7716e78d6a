"""A full disk: the index's filesystem filling up (a real 8 MiB tmpfs in a private mount namespace), the
index's LMDB map used up (a small ``disk.index_map_bytes``), and a daemon on a full filesystem. Each is a
typed condition and a counter, never an I/O error; blocks stored before read back byte-identical; the tier
admits again once there is room, without a restart."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
from full_workers import LAYOUT, PER_REGION, holds, key, payload
from support import run_on_small_tmpfs

from kvtier.config import DiskConfig
from kvtier.disk import DiskTier
from kvtier.disk import tier as tier_module

HERE = Path(__file__).parent


def run_worker(*argv: str) -> str:
    mount = tempfile.mkdtemp(prefix="kvfull", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "daemon"),
                                                        os.environ.get("PYTHONPATH", "")])}
    try:
        done = run_on_small_tmpfs(mount, [sys.executable, str(HERE / "full_workers.py"), *argv, mount], env=env)
    finally:
        os.rmdir(mount)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    return done.stdout


def line(stdout: str, tag: str) -> str:
    return next(text for text in stdout.splitlines() if text.startswith(tag + " "))[len(tag) + 1 :]


def test_a_full_index_filesystem_refuses_new_blocks_keeps_the_stored_and_admits_once_space_is_freed() -> None:
    out = run_worker("tier")
    full = json.loads(line(out, "FULL"))
    assert full == {"fault": "full", "disk_full_errors": 1, "io_errors": 0, "admitting": False}
    log = line(out, "LOG")
    assert "is full" in log and "free space there" in log and "still served" in log and "I/O" not in log
    assert line(out, "SHORT_WRITE") == "DiskFullError"
    refused, counted = map(int, line(out, "REFUSED").split())
    assert refused == PER_REGION and counted == PER_REGION
    assert json.loads(line(out, "RECOVERED")) == {"fault": "", "admitting": True}
    assert "admitting blocks" in line(out, "LOG2")  # the recovery is logged too


def test_a_full_index_map_refuses_new_blocks_and_evictions_make_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tier_module, "_FIRST_RETRY_S", 0.2)
    config = DiskConfig(paths=(str(tmp_path),), capacity_bytes="16MiB", region_bytes="256KiB", io_threads=2,
                        index_map_bytes="128KiB", admission="admit_all", reinsert_hits=0, min_regions=1)
    with DiskTier(config, LAYOUT) as disk, caplog.at_level(logging.WARNING, logger="kvtier.disk.tier"):
        offered = 0
        while disk.stats().fault == "" and offered < 64 * PER_REGION:  # 64 regions: more than the map holds
            disk.offer(key(offered), payload(offered))
            offered += 1
            if offered % PER_REGION == 0:
                disk.flush()
        stats = disk.stats()
        assert (stats.fault, stats.admitting, stats.disk_full_errors, stats.io_errors) == ("index_full", False, 1, 0)
        stored = stats.used_blocks
        assert stored >= 4 * PER_REGION and holds(disk, range(stored))  # what the index recorded reads back
        assert not disk.offer(key(99_999), payload(99_999)) and disk.stats().degraded_rejected == 1
        (message,) = [r.message for r in caplog.records if r.levelno == logging.ERROR]
        assert "disk.index_map_bytes" in message and "still served" in message
        time.sleep(0.25)  # past the pause: the probe evicts the oldest regions, which makes room in the index
        after = range(100_000, 100_000 + 3 * PER_REGION)
        for i in after:
            assert disk.offer(key(i), payload(i))
        disk.flush()
        stats = disk.stats()
        assert (stats.fault, stats.admitting, stats.disk_full_errors) == ("", True, 1)
        assert stats.used_blocks <= stored and holds(disk, after)
        assert any("admitting blocks" in r.message for r in caplog.records)
    with DiskTier(config, LAYOUT) as disk:  # recorded in the index: they survive a reopen
        assert holds(disk, after)


def test_serve_on_a_full_filesystem_keeps_answering_and_its_stats_say_full() -> None:
    out = run_worker("daemon")
    detail = json.loads(line(out, "STATS"))
    assert detail["fault"] == "full" and detail["disk_full_errors"] >= 1 and detail["io_errors"] == 0
    assert detail["admitting"] is False
    assert line(out, "GET") == "True"  # blocks stored before read back byte-identical from the disk tier
    assert "degraded (full)" in line(out, "TABLE")  # kvtier stats' table says it too
    assert line(out, "EXIT") == "0"
