"""Local Redis-protocol servers on loopback for the tests and ``kvtier bench remote``: one server, or a
cluster of masters, each in its own temporary directory on ephemeral ports.

The binary is ``$KVTIER_REDIS_SERVER``, else ``redis-server``, else ``valkey-server`` on ``PATH`` (the
project's ``make test`` installs Debian's ``redis-server``).

Promises:
- ``start_single`` and ``start_cluster`` return only once every server answers (and the cluster reports
  ``cluster_state:ok`` with all slots assigned on every node), or raise ``ServerStartError`` with the
  server's log; they never leave a process behind on failure.
- Nothing is persisted (no RDB, no AOF); ``stop`` (also on ``with`` exit) ends every process and removes
  the directory. ``kill``, ``pause``/``resume`` and ``restart`` act on single nodes, for fault tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

_SLOTS = 16384
_START_TIMEOUT_S = 20.0


class ServerStartError(RuntimeError):
    """A local server could not be started (no binary, or it did not come up)."""


def server_binary() -> str | None:
    """The Redis-protocol server binary to run, or ``None`` if there is none."""
    explicit = os.environ.get("KVTIER_REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class _Node:
    port: int
    args: list[str]
    log_path: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def client(self) -> redis.Redis:
        password = self.args[self.args.index("--requirepass") + 1] if "--requirepass" in self.args else None
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=5,
                           socket_connect_timeout=1)

    def wait_ready(self, deadline: float) -> None:
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerStartError(f"the server on port {self.port} exited:\n{self.log()}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError), self.client() as client:
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise ServerStartError(f"the server on port {self.port} did not answer:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        try:
            with open(self.log_path) as log:
                return log.read()[-4000:]
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class LocalServers:
    """Running servers: ``urls`` to put in ``remote.urls``, ``mode`` for ``remote.mode``."""

    mode: str
    workdir: str
    nodes: list[_Node] = field(default_factory=list)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(node.url for node in self.nodes)

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(node.port for node in self.nodes)

    def client(self, index: int = 0) -> redis.Redis:
        """A plain client of node ``index``, for tests to look at or tamper with what is stored."""
        return self.nodes[index].client()

    def kill(self, *indices: int) -> None:
        for index in indices:
            self.nodes[index].stop(signal.SIGKILL)

    def pause(self, index: int) -> None:
        """Freeze node ``index`` (SIGSTOP): it accepts connections but never answers, a hung server."""
        proc = self.nodes[index].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)

    def resume(self, index: int) -> None:
        proc = self.nodes[index].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGCONT)

    def restart(self, *indices: int) -> None:
        """Start nodes ``indices`` again, empty, on their ports (cluster nodes rejoin from their nodes.conf);
        a cluster is then waited for once every node runs."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        for index in indices:
            self.nodes[index].stop()
            self.nodes[index].spawn()
        for index in indices:
            self.nodes[index].wait_ready(deadline)
        if self.mode == "cluster" and all(node.proc is not None for node in self.nodes):
            self._wait_cluster_ok(deadline)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_cluster_ok(self, deadline: float) -> None:
        for node in self.nodes:
            while True:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" in text and f"cluster_slots_assigned:{_SLOTS}" in text:
                    break
                if time.monotonic() > deadline:
                    raise ServerStartError(f"the cluster did not converge on node {node.port}:\n{text}")
                time.sleep(0.05)


def _start(mode: str, count: int, extra: list[str], binary: str | None, port: int = 0) -> LocalServers:
    binary = binary or server_binary()
    if binary is None:
        raise ServerStartError("no Redis-protocol server binary: install redis-server (make test does, with "
                               "apt-get) or valkey-server, or set KVTIER_REDIS_SERVER")
    servers = LocalServers(mode, tempfile.mkdtemp(prefix="kvtier-redis-"))
    try:
        for i in range(count):
            directory = os.path.join(servers.workdir, str(i))
            os.makedirs(directory, exist_ok=True)
            servers.nodes.append(_spawn_node(mode, binary, directory, extra, port if i == 0 else 0))
        if mode == "cluster":
            _form_cluster(servers)
    except BaseException:
        servers.stop()
        raise
    return servers


def _spawn_node(mode: str, binary: str, directory: str, extra: list[str], port: int) -> _Node:
    """A started server on ``port``, or on a free port (retried if another process takes it first)."""
    for _attempt in range(5):
        chosen = port or _free_port()
        log_path = os.path.join(directory, "server.log")
        args = [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--dir", directory, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no", "--logfile", log_path]
        if mode == "cluster":
            # As docs/remote.md recommends for a cache: the live masters serve their slots while one is down.
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(_free_port()), "--cluster-node-timeout", "3000",
                     "--cluster-require-full-coverage", "no"]
        node = _Node(chosen, args + extra, log_path)
        node.spawn()
        try:
            node.wait_ready(time.monotonic() + _START_TIMEOUT_S)
        except ServerStartError:
            node.stop()
            if port or "Address already in use" not in node.log():
                raise
            continue
        return node
    raise ServerStartError("no free port for a local server after 5 tries")


def _form_cluster(servers: LocalServers) -> None:
    count = len(servers.nodes)
    for i, node in enumerate(servers.nodes):
        with node.client() as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * _SLOTS // count, (i + 1) * _SLOTS // count - 1)
    with servers.nodes[0].client() as first:
        for node in servers.nodes[1:]:
            bus_port = node.args[node.args.index("--cluster-port") + 1]
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
    servers._wait_cluster_ok(time.monotonic() + _START_TIMEOUT_S)


def start_single(*, maxmemory: str = "", policy: str = "allkeys-lru", binary: str | None = None,
                 port: int = 0, args: tuple[str, ...] = ()) -> LocalServers:
    """One server (on ``port``, default any free one); with ``maxmemory`` (e.g. ``"64mb"``) it evicts by
    ``policy`` (``noeviction``: OOM replies instead); ``args``: more server options (``--requirepass``)."""
    extra = ["--maxmemory", maxmemory, "--maxmemory-policy", policy] if maxmemory else []
    return _start("single", 1, extra + list(args), binary, port)


def start_cluster(masters: int = 3, *, binary: str | None = None) -> LocalServers:
    """A cluster of ``masters`` masters, no replicas, the slots split evenly."""
    return _start("cluster", masters, [], binary)
