"""``kvtier serve`` as a process: start-up log, clean shutdown on signals, bad settings, disk recovery."""

from __future__ import annotations

import dataclasses
import grp
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch

from kvtier import (
    ConfigError,
    DaemonConfig,
    DiskConfig,
    DiskError,
    HostConfig,
    LayoutMismatchError,
    ProtocolError,
    Store,
    StoreConfig,
    Tier,
    TransferConfig,
)
from kvtier.cli import main as daemon_main
from kvtier.daemon import serve_cmd
from kvtier.daemon.server import Daemon
from kvtier.disk.tier import data_file_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import DaemonProc, Kit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_daemon_cleanly_with_writes_in_flight(
        make_daemon: Callable[..., DaemonProc], kit: Kit, signum: int) -> None:
    daemon = make_daemon()
    client = daemon.client()
    client.put([kit.key_of(0)], [kit.block_for(kit.key_of(0))]).wait(10)
    client.reserve([kit.key_of(1)])  # an in-flight write, never committed
    assert daemon.stop(signum) == 0
    log = daemon.log()
    for line in ("opened store", "host pool 1.0 MiB", "listening on unix socket", "mode 0600", "disk off",
                 "daemon stopped"):
        assert line in log, line
    assert not Path(daemon.socket_path).exists()
    assert not list(Path("/dev/shm").glob(f"kvtier-daemon-{daemon.proc.pid}-*"))
    with pytest.raises(ProtocolError):
        client.lookup([kit.key_of(0)])
    client.close()


def test_without_a_configured_layout_the_first_hello_sets_it(make_daemon: Callable[..., DaemonProc],
                                                             kit: Kit) -> None:
    daemon = make_daemon(layout=False)
    assert daemon.stats()["stats"] is None and "opened store" not in daemon.log()
    with daemon.client() as client:
        assert client.lookup([kit.key_of(0)]).num_blocks == 0
    assert "opened store" in daemon.log()
    assert daemon.stats()["daemon"]["layout"] == kit.layout.to_dict()


@pytest.mark.parametrize("args", [["--layout", "num_layers=zero"], ["--set", "daemon.tcp_port=5000"],
                                  ["--socket-group", "no-such-group-kvtier"], ["--pool", "lots"],
                                  ["--layout", "num_layers=2,dtype=float32,head_dim=8"],
                                  ["--set", "daemon.connect=5"], ["--set", "daemon.max_frame_bytes=10"],
                                  ["--set", "host.prefault=2"], ["--layout", "num_layers"]])
def test_bad_settings_exit_2_before_opening_anything(args: list[str], tmp_path: Path) -> None:
    socket_path = tmp_path / "never.sock"
    settings, flags = (args, []) if args[0] == "--set" else ([], args)
    assert daemon_main([*settings, "serve", "--no-disk", "--socket", str(socket_path), *flags]) == 2
    assert not socket_path.exists()


@pytest.mark.parametrize("kind", ["file", "fifo", "directory"])
def test_serve_never_replaces_a_file_that_is_not_a_stale_socket(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "precious"
    if kind == "file":
        target.write_text("keep me")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    done = subprocess.run([sys.executable, "-m", "kvtier.daemon", "serve", "--no-disk", "--metrics-port", "0",
                           "--socket", str(target), "--pool", "1MiB"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "kvtier: error:" in done.stderr and "not a socket" in done.stderr and "Traceback" not in done.stderr
    assert target.exists() and (kind != "file" or target.read_text() == "keep me")
    assert stat.S_ISFIFO(target.stat().st_mode) == (kind == "fifo")


def test_a_second_daemon_on_the_same_socket_is_refused(make_daemon: Callable[..., DaemonProc]) -> None:
    first = make_daemon()
    second = Daemon(StoreConfig(daemon=DaemonConfig(socket_path=first.socket_path, metrics_port=0)))
    with pytest.raises(ConfigError, match="another daemon"):
        second.start()
    second.stop()  # must leave the first daemon's socket alone
    assert first.stats()["daemon"]["pid"] == first.proc.pid


def test_the_disk_tier_is_recovered_on_restart(make_daemon: Callable[..., DaemonProc], kit: Kit,
                                              tmp_path: Path) -> None:
    disk_args = ("--disk", str(tmp_path / "disk"))
    settings = ("disk.write_mode=through", "disk.admission=admit_all", "disk.capacity_bytes=4MiB",
                "disk.region_bytes=256KiB")
    keys = [kit.key_of(i, "restart") for i in range(20)]
    first = make_daemon(*disk_args, settings=settings)
    with first.client() as client:
        assert client.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
    assert first.stop() == 0
    second = make_daemon(*disk_args, settings=settings)
    with second.client() as client:
        assert client.lookup(keys).tiers == (Tier.DISK,) * 20
        out = [torch.empty(kit.layout.block_shape) for _ in keys]
        assert client.get(keys, out).wait(30).ok
        assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, keys, strict=True))


@pytest.mark.parametrize("group", [False, True])
def test_the_socket_and_arena_modes_follow_the_group_setting(tmp_path: Path, kit: Kit, group: bool) -> None:
    name = grp.getgrgid(os.getgid()).gr_name if group else ""
    config = StoreConfig(host=HostConfig(capacity_bytes=2**20), daemon=DaemonConfig(
        socket_path=str(tmp_path / "d.sock"), socket_group=name, metrics_port=0, layout=kit.layout))
    daemon = Daemon(config)
    daemon.start()
    try:
        (arena,) = Path("/dev/shm").glob(f"kvtier-daemon-{os.getpid()}-*")
        for path in (tmp_path / "d.sock", arena):
            assert stat.S_IMODE(path.stat().st_mode) == (0o660 if group else 0o600), path
            assert path.stat().st_gid == os.getgid()
    finally:
        daemon.stop()
    assert not (tmp_path / "d.sock").exists() and not arena.exists()


def test_a_store_that_cannot_open_is_a_typed_error_to_every_client(make_daemon: Callable[..., DaemonProc],
                                                                    tmp_path: Path) -> None:
    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    daemon = make_daemon("--disk", str(not_a_directory), layout=False)
    for _ in range(2):  # the next client gets the same answer, not an internal error
        with pytest.raises(DiskError, match="cannot open its store"):
            daemon.client()
    assert daemon.stats()["daemon"]["error_replies"] == {"DiskError": 2}
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log and "cannot open the store" in log


def test_only_abandoned_arenas_of_dead_daemons_are_removed_at_start() -> None:
    from kvtier.arena import HostArena
    from kvtier.daemon.server import _remove_stale_arenas

    shm = Path("/dev/shm")
    unused_pid = 2**22 + 1  # above the largest pid_max Linux allows: no process has it, here or anywhere
    tag = os.urandom(4).hex()
    # A live daemon in another PID namespace (a container sharing /dev/shm): its id means nothing here, it
    # holds its arena's lock. Simulated by an arena this process created under that id.
    elsewhere = HostArena(1, 4096, name=f"kvtier-daemon-{unused_pid}-{tag}a")
    dead = shm / f"kvtier-daemon-{unused_pid}-{tag}b"  # its daemon died: nobody holds the lock
    dead.write_bytes(b"")
    older_live = shm / f"kvtier-daemon-{os.getpid()}-{tag}c"  # an older kvtier's live daemon: no lock, id alive
    older_live.write_bytes(b"")
    try:
        _remove_stale_arenas(min_age_s=0)
        assert (shm / elsewhere.name).exists() and older_live.exists() and not dead.exists()
    finally:
        elsewhere.close(unlink=True)
        for path in (dead, older_live):
            path.unlink(missing_ok=True)


def test_the_default_disk_reopens_with_its_blocks_after_the_free_space_changed(
        tmp_path: Path, kit: Kit, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default tier is half the free space of the user's data directory, its own file counted as free,
    # and a small tier's regions scale with its capacity. ``drive_free`` is what the drive would have free
    # without the tier's file: a restart on an unchanged drive finds the same capacity (a second start used
    # to halve it), and one after the drive filled up or emptied still opens the directory with its blocks.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    path = tmp_path / "kvtier" / "disk"
    keys = [kit.key_of(i, "default-disk") for i in range(12)]
    for start, drive_free in enumerate((1 << 30, 1 << 30, 640 << 20, 2 << 30)):
        free = drive_free - data_file_bytes(str(path))
        monkeypatch.setattr(shutil, "disk_usage", lambda _path, free=free: SimpleNamespace(free=free))
        disk = dataclasses.replace(serve_cmd._default_disk(DiskConfig()), write_mode="through",
                                   admission="admit_all")
        assert disk.paths == (str(path),) and disk.capacity_bytes == drive_free // 2
        config = StoreConfig(host=HostConfig(capacity_bytes=1 << 20), disk=disk,
                             transfer=TransferConfig(backend="cpu"))
        with Store(kit.layout, config) as store:
            assert store.lookup(keys, prefetch=False).tiers == (Tier.DISK,) * (12 if start else 0)
            assert store.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
            store.flush()
            out = [torch.empty(kit.layout.block_shape) for _ in keys]
            assert store.get(keys, out).wait(10).ok
            assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, keys, strict=True))


def test_the_default_disk_starts_empty_for_another_model(tmp_path: Path, kit: Kit, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # A configured directory of another layout is refused (the user chose it); the daemon's own is taken over.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=1 << 30))
    disk = dataclasses.replace(serve_cmd._default_disk(DiskConfig()), write_mode="through", admission="admit_all")
    config = StoreConfig(host=HostConfig(capacity_bytes=1 << 20), disk=disk, transfer=TransferConfig(backend="cpu"))
    keys = [kit.key_of(i, "model-a") for i in range(4)]
    with Store(kit.layout, config) as store:
        assert store.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
        store.flush()
    other = dataclasses.replace(kit.layout, num_layers=kit.layout.num_layers + 1)
    with pytest.raises(LayoutMismatchError):
        Store(other, dataclasses.replace(config, disk=dataclasses.replace(disk, wipe_incompatible=False)))
    with Store(other, config) as store:
        assert "wiping it" in caplog.text and store.lookup(keys, prefetch=False).num_blocks == 0
    with Store(kit.layout, config) as store:  # and the first model's blocks are gone, never misread
        assert store.lookup(keys, prefetch=False).num_blocks == 0


def test_no_default_disk_on_a_drive_with_less_than_two_regions_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: SimpleNamespace(free=100 << 20))
    assert serve_cmd._default_disk(DiskConfig()).paths == ()
    assert "no disk tier" in caplog.text
    assert serve_cmd._default_disk(DiskConfig(region_bytes="32MiB")).capacity_bytes == 32 << 20
