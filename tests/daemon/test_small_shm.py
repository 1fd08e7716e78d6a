"""A host pool and a small ``/dev/shm`` (a real 8 MiB tmpfs mounted over it in a private mount namespace, as
in a container started without ``--shm-size``): the embedded store does not need ``/dev/shm``, a daemon pool
that does not fit is refused at start with what to do, and no process ever dies of SIGBUS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"


def in_small_shm(*argv: str, size: str = "8m") -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a new mount namespace whose ``/dev/shm`` is a tmpfs of ``size`` (and a new PID namespace, so
    that a daemon it started dies with it)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a small /dev/shm")
    probe = subprocess.run(["unshare", "-m", "-p", "-f", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace: {probe.stderr.decode().strip()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "-m", "-p", "-f", "sh", "-c", script, "sh", *argv], capture_output=True,
                          text=True, timeout=300, env=env)


def test_the_embedded_store_fills_a_pool_larger_than_dev_shm() -> None:
    done = in_small_shm(sys.executable, str(HERE / "shm_workers.py"), "embedded", "16")
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr  # SIGBUS is returncode -7


def test_a_named_arena_larger_than_dev_shm_is_refused_and_leaves_no_file() -> None:
    done = in_small_shm(sys.executable, str(HERE / "shm_workers.py"), "named", "16")
    assert done.returncode == 0, done.stderr
    assert "does not fit in /dev/shm" in done.stdout and "--shm-size" in done.stdout
    assert "LEFT []" in done.stdout


def test_serve_refuses_a_pool_larger_than_dev_shm_with_what_to_do() -> None:
    workdir = tempfile.mkdtemp(prefix="kvs", dir="/tmp")
    try:
        done = in_small_shm(sys.executable, "-m", "kvtier.daemon", "serve", "--socket", f"{workdir}/d.sock",
                            "--pool", "16MiB", "--no-disk", "--metrics-port", "0", "--layout", LAYOUT_ARG)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("kvtier: error:") and "/dev/shm" in done.stderr and "--shm-size" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_daemon_pool_keeps_its_pages_when_another_tenant_fills_dev_shm() -> None:
    workdir = tempfile.mkdtemp(prefix="kvs", dir="/tmp")
    try:
        done = in_small_shm(sys.executable, str(HERE / "shm_workers.py"), "daemon", f"{workdir}/d.sock", "4MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert done.returncode == 0 and "OK" in done.stdout and "EXIT 0" in done.stdout, done.stderr
