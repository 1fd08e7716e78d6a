"""``kvtier serve``: run the daemon in the foreground until SIGTERM or SIGINT.

Promises:
- With no configuration at all it runs: a host pool of half the available RAM (and of free ``/dev/shm``),
  at most ``daemon.pool_cap_bytes``; a disk tier in ``<user data dir>/kvtier/disk`` unless ``--no-disk``
  (half the free space there, its own file counted as free, so a restart finds the same tier; none on a
  drive with less than two regions free; started empty, with a warning, where it holds another layout or
  format: a daemon started for another model serves it instead of refusing it);
  a remote tier only with ``[remote] urls`` (TOML or ``--set remote.urls=...``);
  the socket in the user's runtime directory; the layout of the first client.
- Settings come from the defaults, then the ``--config`` TOML file and ``--set`` overrides, then this
  command's flags. A bad setting (a pool larger than the free ``/dev/shm`` among them) exits with status 2
  and one ``kvtier: error:`` line, before anything is opened (or, found while opening, after closing it).
- On start it logs what it opened: pool size and arena, disk paths and their mode, socket, TCP, metrics.
- SIGTERM or SIGINT stops it cleanly (see ``Daemon.stop``) and it exits 0; a restart on the same disk
  paths finds the blocks the disk tier kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import threading

from kvtier.config import DiskConfig, StoreConfig, parse_bytes
from kvtier.daemon.server import Daemon
from kvtier.disk.tier import data_file_bytes
from kvtier.errors import ConfigError, KvtierError
from kvtier.layout import KVLayout
from kvtier.tiers.redis_client import redact

HELP = "run the kvtier daemon: one host pool and disk tier shared by every engine process on this host"
log = logging.getLogger("kvtier.daemon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", help="Unix socket path (daemon.socket_path)")
    parser.add_argument("--socket-group", help="group allowed to connect; socket mode 0660 (daemon.socket_group)")
    parser.add_argument("--tcp-port", type=int, help="TCP port for remote clients, 0 off (daemon.tcp_port)")
    parser.add_argument("--tcp-host", help="address the TCP listener binds (daemon.tcp_host)")
    parser.add_argument("--tcp-token", help="shared token for TCP clients; default $KVTIER_TCP_TOKEN "
                                            "(daemon.tcp_token)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port on 127.0.0.1, 0 off (daemon.metrics_port)")
    parser.add_argument("--pool", help="host pool size, e.g. 8GiB; default: from available RAM (daemon.pool_bytes)")
    parser.add_argument("--disk", action="append", metavar="PATH", help="disk tier directory (repeat to stripe)")
    parser.add_argument("--no-disk", action="store_true", help="no disk tier")
    parser.add_argument("--layout", help="the KV layout served, e.g. num_layers=32,num_kv_heads=8,head_dim=128,"
                                         "dtype=bfloat16,block_tokens=16[,kind=kv]; default: the first client's")


def parse_layout(text: str) -> KVLayout:
    """A ``KVLayout`` from ``field=value,...``; ``ConfigError`` on a bad field."""
    fields: dict[str, object] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--layout expects field=value pairs, got {item!r}")
        fields[name.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return KVLayout.from_dict(fields)


def free_shm_bytes() -> int:
    shm = os.statvfs("/dev/shm")
    return shm.f_bavail * shm.f_frsize


def auto_pool_bytes(cap_bytes: int) -> int:
    """Half the available RAM and half the free ``/dev/shm``, at most ``cap_bytes``."""
    available = cap_bytes * 2
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return min(available // 2, free_shm_bytes() // 2, cap_bytes)


def resolve_config(args: argparse.Namespace, config: StoreConfig) -> StoreConfig:
    """The daemon's final configuration: ``config`` with this command's flags and the embedded defaults."""
    daemon = config.daemon
    changes: dict[str, object] = {}
    for flag, name in (("socket", "socket_path"), ("socket_group", "socket_group"), ("tcp_port", "tcp_port"),
                       ("tcp_host", "tcp_host"), ("tcp_token", "tcp_token"), ("metrics_port", "metrics_port")):
        if getattr(args, flag) is not None:
            changes[name] = getattr(args, flag)
    if not (changes.get("tcp_token") or daemon.tcp_token) and os.environ.get("KVTIER_TCP_TOKEN"):
        changes["tcp_token"] = os.environ["KVTIER_TCP_TOKEN"]
    if args.pool is not None:
        changes["pool_bytes"] = parse_bytes(args.pool, "--pool")
    if args.layout is not None:
        changes["layout"] = parse_layout(args.layout)
    if args.no_disk:
        changes["default_disk"] = False
    daemon = dataclasses.replace(daemon, **changes)  # type: ignore[arg-type]
    pool = daemon.pool_bytes or auto_pool_bytes(daemon.pool_cap_bytes)
    if pool > free_shm_bytes():
        raise ConfigError(f"the host pool (--pool / daemon.pool_bytes) of {pool / 2**20:.0f} MiB does not fit in "
                          f"/dev/shm ({free_shm_bytes() / 2**20:.0f} MiB free): give a smaller pool, or enlarge "
                          "/dev/shm (in a container: docker run --shm-size=...)")
    host = dataclasses.replace(config.host, capacity_bytes=pool)
    disk = config.disk
    if args.no_disk:
        disk = dataclasses.replace(disk, paths=())
    elif args.disk:
        disk = dataclasses.replace(disk, paths=tuple(args.disk))
    elif not disk.paths and daemon.default_disk:
        disk = _default_disk(disk)
    return dataclasses.replace(config, host=host, disk=disk, daemon=daemon)


def _default_disk(disk: DiskConfig) -> DiskConfig:
    """The disk tier in the user's data directory: half the space free there, counting the tier's own data
    file as free (without it, every restart halved the tier and dropped the blocks beyond), in whole
    ``region_bytes``, at most ``disk.capacity_bytes``; none where that is less than one region."""
    import platformdirs

    path = platformdirs.user_data_path("kvtier") / "disk"
    path.mkdir(parents=True, exist_ok=True)
    available = shutil.disk_usage(path).free + data_file_bytes(str(path))
    capacity = min(disk.capacity_bytes, available // 2 // disk.region_bytes * disk.region_bytes)
    if capacity < disk.region_bytes:
        log.warning("no disk tier: %s has %.0f MiB free, less than two regions of disk.region_bytes (set "
                    "disk.paths and disk.capacity_bytes to use a disk tier there anyway)", path, available / 2**20)
        return dataclasses.replace(disk, paths=())
    # The directory is the daemon's, not one the user chose: a daemon started for another model (another KV
    # layout) or by another kvtier version starts it empty instead of refusing every client.
    return dataclasses.replace(disk, paths=(str(path),), capacity_bytes=capacity, wipe_incompatible=True)


def run(args: argparse.Namespace, config: StoreConfig) -> int:
    # A bad setting raises ConfigError to ``kvtier.cli``: one ``kvtier: error:`` line and status 2.
    config = resolve_config(args, config)
    daemon = Daemon(config)
    # Request threads hold the GIL for tens of microseconds each; a shorter switch interval than the default
    # 5 ms bounds how long a fast lookup can wait behind a long request (a TCP payload copy, a stats call).
    sys.setswitchinterval(0.0005)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("starting: host pool %.1f MiB, disk %s (direct I/O %s, %s each, write-%s), remote %s, transfer %s",
             config.host.capacity_bytes / 2**20, list(config.disk.paths) or "off", config.disk.direct_io,
             f"{config.disk.capacity_bytes / 2**20:.0f} MiB", config.disk.write_mode,
             f"{[redact(url) for url in config.remote.urls]} ({config.remote.mode}, write-{config.remote.write_mode})"
             if config.remote.urls else "off", config.transfer.backend)
    try:
        daemon.start()
    except ConfigError:
        daemon.stop()
        raise
    except (KvtierError, OSError) as exc:
        log.error("cannot start: %s", exc)
        print(f"kvtier: error: cannot start: {exc}", file=sys.stderr)
        daemon.stop()
        return 1
    log.info("kvtier daemon ready (pid %d)", os.getpid())
    # A timed wait, so that the signal handler runs promptly on every Python version.
    while not stop.wait(0.5):
        pass
    log.info("signal received: stopping")
    daemon.stop()
    return 0

