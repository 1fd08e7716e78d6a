"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch

from kvtier import KVLayout, Store

StoreFactory = Callable[..., Store]


def random_blocks(layout: KVLayout, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.block_shape, generator=generator) for _ in range(count)]


def run_on_small_tmpfs(mountpoint: str, argv: Sequence[str], size: str = "8m",
                       env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new mount (and PID) namespace where ``mountpoint`` is a fresh tmpfs of ``size``: a real
    small filesystem that fills up, gone with the namespace. Skips the test without root or unshare(1)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a small filesystem")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mountpoint}"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.decode().strip()}")
    script = f'mount -t tmpfs -o size={size} tmpfs "{mountpoint}" && exec "$@"'
    return subprocess.run(["unshare", "-m", "-p", "-f", "sh", "-c", script, "sh", *argv], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ if env is None else env))
