from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtier import ClosedError, ConfigError
from kvtier.arena import HostArena, remove_if_abandoned


def test_slots_are_page_aligned_views() -> None:
    arena = HostArena(4, 8192)
    try:
        assert arena.tensor.data_ptr() % 4096 == 0
        assert [arena.slot(i).data_ptr() - arena.tensor.data_ptr() for i in range(4)] == [0, 8192, 16384, 24576]
        arena.slot(2).fill_(7)
        assert int(arena.tensor[16384:24576].sum()) == 7 * 8192
        assert arena.pinned_bytes == 0 or torch.cuda.is_available()
    finally:
        arena.close()
    with pytest.raises(ClosedError):
        arena.slot(0)


def test_anonymous_arena_leaves_nothing_in_dev_shm() -> None:
    arena = HostArena(1, 4096)
    assert not (Path("/dev/shm") / arena.name).exists()
    arena.close()


@pytest.mark.parametrize(("num_slots", "slot_bytes"), [(0, 4096), (1, 100), (1, 0)])
def test_bad_geometry(num_slots: int, slot_bytes: int) -> None:
    with pytest.raises(ConfigError):
        HostArena(num_slots, slot_bytes)


_CHILD = """
import sys, torch
from kvtier.arena import HostArena
arena = HostArena(2, 4096, name=sys.argv[1], create=False)
print(arena.slot(0)[:4].tolist())
arena.slot(1)[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)
arena.close()
"""


def test_two_processes_share_the_same_bytes() -> None:
    name = f"kvtier-test-{id(object())}"
    arena = HostArena(2, 4096, name=name)
    try:
        arena.slot(0)[:4] = torch.tensor([9, 8, 7, 6], dtype=torch.uint8)
        child = subprocess.run([sys.executable, "-c", _CHILD, name], capture_output=True, text=True, timeout=120,
                               check=True)
        assert child.stdout.strip() == "[9, 8, 7, 6]"
        assert arena.slot(1)[:3].tolist() == [1, 2, 3]
        with pytest.raises(ConfigError):
            HostArena(2, 4096, name=name)  # already exists
        with pytest.raises(ConfigError):
            HostArena(4, 4096, name=name, create=False)  # larger than the object
    finally:
        arena.close(unlink=True)
    assert not (Path("/dev/shm") / name).exists()


def test_a_named_arena_is_locked_by_its_creator_until_it_closes() -> None:
    name = f"kvtier-test-lock-{os.getpid()}-{secrets.token_hex(4)}"
    path = Path("/dev/shm") / name
    arena = HostArena(2, 4096, name=name)
    attached = HostArena(2, 4096, name=name, create=False)
    try:
        assert not remove_if_abandoned(path, min_age_s=0) and path.exists()  # its creator holds the lock
        attached.close()
        assert not remove_if_abandoned(path, min_age_s=0) and path.exists()  # an attachment never held it
    finally:
        arena.close()  # the lock goes with the creator (as when it dies), the file stays
    try:
        assert not remove_if_abandoned(path) and path.exists()  # too young to be taken for abandoned
        assert remove_if_abandoned(path, min_age_s=0) and not path.exists()
        assert not remove_if_abandoned(path, min_age_s=0)  # gone: nothing to do
    finally:
        path.unlink(missing_ok=True)


def test_a_killed_creator_leaves_its_arena_unlocked() -> None:
    name = f"kvtier-test-killed-{os.getpid()}-{secrets.token_hex(4)}"
    path = Path("/dev/shm") / name
    code = ("import sys, time; from kvtier.arena import HostArena; HostArena(2, 4096, name=sys.argv[1]); "
            "print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert not remove_if_abandoned(path, min_age_s=0)
        child.kill()
        child.wait(30)
        assert remove_if_abandoned(path, min_age_s=0) and not path.exists()
    finally:
        child.kill()
        child.wait(30)
        path.unlink(missing_ok=True)
