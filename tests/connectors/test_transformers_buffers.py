"""The restore buffer pool: memory is reused only once nothing refers to it, and idle memory is bounded."""

from __future__ import annotations

import gc

import pytest
import torch

from kvtier import InvalidInputError
from kvtier_connectors.transformers.buffers import RestoreBuffers


def test_a_buffer_is_reused_once_every_view_of_it_is_gone() -> None:
    pool = RestoreBuffers(max_idle_bytes=1 << 20)
    first = pool.take(1000)
    assert first.numel() == 1000 and first.data_ptr() % 64 == 0
    address = first.data_ptr()
    view = first.view(torch.int32)[10:]
    del first
    second = pool.take(1000)  # a view still holds the first buffer
    assert second.data_ptr() != address and pool.allocated == 2
    addresses = {address, second.data_ptr()}
    del view, second
    gc.collect()
    assert pool.idle_bytes() >= 2000
    third = pool.take(900)
    assert pool.reused == 1 and third.data_ptr() in addresses


def test_a_small_request_does_not_take_a_buffer_more_than_twice_its_size() -> None:
    pool = RestoreBuffers(max_idle_bytes=1 << 20)
    big = pool.take(100_000)
    address = big.data_ptr()
    del big
    small = pool.take(1_000)
    assert small.data_ptr() != address and pool.reused == 0
    del small
    assert pool.take(60_000).data_ptr() == address and pool.reused == 1


def test_idle_memory_beyond_the_bound_is_freed_least_recent_first() -> None:
    pool = RestoreBuffers(max_idle_bytes=3000)
    buffers = [pool.take(1000) for _ in range(4)]
    del buffers
    pool.take(10)  # a take trims what nothing uses
    assert pool.idle_bytes() <= 3000
    none_kept = RestoreBuffers(max_idle_bytes=0)
    first = none_kept.take(100)
    del first
    second = none_kept.take(100)
    assert none_kept.reused == 0 and none_kept.allocated == 2 and second.numel() == 100
    assert none_kept.idle_bytes() == 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        RestoreBuffers(max_idle_bytes=-1)
    with pytest.raises(InvalidInputError):
        RestoreBuffers().take(-5)
