"""Devices: O_DIRECT detection, aligned I/O straight into tensors, the memory device's faults."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from kvtier.disk.device import FileDevice, MemoryDevice, aligned_buffer, aligned_tensor, supports_direct_io, tensor_view
from kvtier.errors import InvalidInputError

MiB = 1024 * 1024


def test_aligned_tensor_starts_on_a_page() -> None:
    for nbytes in (1, 4096, 12345):
        tensor = aligned_tensor(nbytes)
        assert tensor.data_ptr() % 4096 == 0 and tensor.numel() == nbytes and tensor.dtype == torch.uint8


@pytest.mark.parametrize("direct", [True, False])
def test_file_device_reads_and_writes_straight_into_tensors(tmp_path: Path, direct: bool) -> None:
    if direct and not supports_direct_io(str(tmp_path)):
        pytest.skip("this filesystem has no O_DIRECT")
    device = FileDevice(str(tmp_path / "data"), MiB, direct)
    assert os.path.getsize(tmp_path / "data") == MiB  # preallocated
    source = torch.arange(8192, dtype=torch.int32).view(torch.uint8)[: 3 * 4096]
    out_page = aligned_buffer(4096)
    src = aligned_tensor(3 * 4096)
    src.copy_(source)
    device.write(4096, tensor_view(src))
    device.sync()
    dst = aligned_tensor(2 * 4096)
    assert device.read(4096, [memoryview(out_page), tensor_view(dst)]) == 3 * 4096
    assert bytes(out_page) == bytes(tensor_view(src)[:4096])
    assert torch.equal(dst, source[4096:])
    device.close()


def test_direct_device_refuses_unaligned_io() -> None:
    device = MemoryDevice(MiB, direct_io=True)
    with pytest.raises(InvalidInputError):
        device.read(100, [memoryview(bytearray(4096))])
    with pytest.raises(InvalidInputError):
        device.write(0, memoryview(bytearray(100)))
    with pytest.raises(InvalidInputError):
        device.read(MiB, [memoryview(bytearray(4096))])  # past the end


def test_memory_device_faults() -> None:
    device = MemoryDevice(MiB)
    device.write(0, memoryview(bytes(range(256)) * 32))
    device.corrupt(3)
    out = bytearray(8192)
    assert device.read(0, [memoryview(out)]) == 8192 and out[3] == 3 ^ 0xFF
    device.truncate(4096 + 10)
    assert device.read(0, [memoryview(bytearray(4096)), memoryview(bytearray(4096))]) == 4106
    device.write_errno = errno.ENOSPC
    with pytest.raises(OSError) as info:
        device.write(0, memoryview(bytearray(4096)))
    assert info.value.errno == errno.ENOSPC
