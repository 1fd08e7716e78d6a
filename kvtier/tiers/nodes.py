"""The servers of the remote tier, node by node: which node owns a key, each node's health, and pipelines run
on every node at once under one deadline.

A single server is one node. A cluster's slot map comes from ``CLUSTER SLOTS`` asked of any node that
answers with a well-formed map (a malformed one counts as no answer); each master is a node with a client
(connection pool) of its own.

Promises:
- ``execute`` sends each node's commands as one pipeline, to all nodes at once, and returns within
  ``timeout_ms`` (plus ``connect_timeout_ms`` where a connection is opened) whatever the servers do, a reply
  trickled a byte at a time included. Each
  reply is the command's answer or an exception object: the fault of its node, or ``NodeDown`` (at once)
  for a key whose node is down or unknown. It never raises.
- A fault (refused, dropped or timed-out connection) marks only that node down; the other nodes serve on.
  ``revive`` pings the down nodes whose backoff expired, each with its own backoff (``reconnect_min_ms``
  doubling to ``reconnect_max_ms``), reset only by that node's own answer; a cluster node is back only once
  it also says ``cluster_state:ok`` (a restarted master answers PING while it still refuses writes with
  CLUSTERDOWN). Each change of a node's state,
  and of the whole tier's, is logged once.
- In a cluster, MOVED and ASK replies naming the key's slot are followed once within the same call (any
  other is an error reply); a MOVED marks the slot map stale and the next ``revive`` refreshes it (a cluster
  also refreshes it while a node is down: a replica may take over). A single server's redirect is an error
  reply, never followed to the host it names.
- ``generation`` changes whenever a node may have lost values: it came back up, restarted (a new
  ``run_id``) or evicted keys (``evicted_keys`` grew), as ``revive`` sees at most every ``WATCH_S``.
- Only redacted URLs (no password) are logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from kvtier.config import RemoteConfig
from kvtier.tiers.redis_client import RequestCounter, redact, server_client, server_options

_LOG = logging.getLogger("kvtier.tiers.remote")
SLOTS = 16384
# How often up nodes are asked whether they restarted or evicted keys (one INFO each).
WATCH_S = 1.0


class NodeDown(Exception):
    """The reply for a key whose node is down (or, in a cluster, whose slot no known node serves)."""


_NODE_DOWN = NodeDown("the node of this key is down")


def _slot_ranges(answer: Any, source_host: str) -> list[tuple[int, int, str, int]] | None:
    """``(first slot, last slot, master host, port)`` of each row of a CLUSTER SLOTS answer (no host: the
    answering node's); ``None`` if any row is malformed (a slot out of range, no master, no port): a server's
    junk is no slot map, and must not fail the tier's start or its reviver."""
    ranges: list[tuple[int, int, str, int]] = []
    try:
        rows = answer.items() if isinstance(answer, dict) else [((row[0], row[1]), row[2:]) for row in answer]
        for (start, end), holders in rows:
            master = holders[0]
            host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
            first, last, port = int(start), int(end), int(master[1])
            if not 0 <= first <= last < SLOTS or not 0 < port < 65536:
                return None
            ranges.append((first, last, host or source_host, port))
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return ranges


class Node:
    """One server: its client, its health and its backoff."""

    def __init__(self, name: str, client: redis.Redis, watcher: redis.Redis, backoff_s: float) -> None:
        # ``watcher``: a client whose requests are not counted as the tier's (INFO, once a second).
        self.name, self.client, self.watcher = name, client, watcher
        self.up = False
        self.retry_at = 0.0  # down: when to ping it next
        self.backoff_s = backoff_s
        self.run_id = ""
        self.evicted = -1


class Nodes:
    """The nodes of ``config`` (see the module docstring)."""

    def __init__(self, config: RemoteConfig, counter: RequestCounter) -> None:
        self.config, self._counter = config, counter
        self._cluster = config.mode == "cluster"
        self._seed_options = [server_options(config, url) for url in config.urls]  # ConfigError if unusable
        self._min_s, self._max_s = config.reconnect_min_ms / 1000, config.reconnect_max_ms / 1000
        self._wait_s = (config.timeout_ms + config.connect_timeout_ms) / 1000
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self._slots: list[Node | None] = [None] * SLOTS
        self._stale = self._cluster
        self._refresh_at = 0.0
        self._watch_at = 0.0
        self._tier_up = False
        self._started = False
        self._last_error: BaseException | None = None
        self.generation = 0
        self.counters = {"faults": 0, "reconnects": 0, "redirects": 0, "topology_refreshes": 0}
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvtier-remote-node")
        if not self._cluster:
            self._single = self._node_locked(self._seed_options[0], {})

    # -- state ------------------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether any node serves (in a cluster: with a known slot map)."""
        return self._tier_up

    def serves(self, server_key: bytes) -> bool:
        """Whether the node owning ``server_key`` is up (no I/O)."""
        node = self._owner(server_key)
        return node is not None and node.up

    def counts(self) -> dict[str, int]:
        with self._lock:
            up = sum(node.up for node in self._nodes.values())
            return {**self.counters, "nodes": len(self._nodes), "nodes_up": up}

    def _owner(self, server_key: bytes) -> Node | None:
        if not self._cluster:
            return self._single
        return self._slots[key_slot(server_key)]

    def _node_locked(self, options: dict[str, Any], address: dict[str, Any]) -> Node:
        name = address.get("path") or options.get("path") or (
            f"{address.get('host', options.get('host'))}:{address.get('port', options.get('port', 6379))}")
        node = self._nodes.get(name)
        if node is None:
            node = Node(name, server_client(options, self._counter, **address), server_client(options, None, **address),
                        self._min_s)
            self._nodes[name] = node
        return node

    def _node_at(self, host: str, port: int) -> Node:
        with self._lock:
            return self._node_locked(self._seed_options[0], {"host": host, "port": port})

    # -- commands ---------------------------------------------------------------------------------------

    def execute(self, commands: Sequence[tuple[Any, ...]], during: str) -> list[Any]:
        """The replies of ``commands`` (each ``(NAME, key, *args)``), aligned with them; see the module
        docstring. ``during`` names the operation in logs."""
        replies: list[Any] = [_NODE_DOWN] * len(commands)
        groups: dict[Node, list[int]] = {}
        for i, command in enumerate(commands):
            node = self._owner(command[1])
            if node is not None and node.up:
                groups.setdefault(node, []).append(i)
        deadline = time.monotonic() + self._wait_s
        self._run(groups, commands, replies, during, deadline, asking=False)
        redirected: dict[tuple[Node, bool], list[int]] = {}
        for i, reply in enumerate(replies):
            # A redirect names the key's own slot; one naming another (or none: out of range) is the server's
            # error, and stays an error reply: following it would remap another key's slot, or raise. A single
            # server's is never followed: it names a host nobody configured, which would get the password.
            if (self._cluster and isinstance(reply, AskError | MovedError)
                    and reply.slot_id == key_slot(commands[i][1])):
                target = self._node_at(reply.host, int(reply.port))
                moved = type(reply) is MovedError
                if moved:
                    self._slots[reply.slot_id] = target
                    self._stale = True
                if not target.up and target.retry_at > 0:
                    continue  # known down: the reply stays the redirect, an error reply
                redirected.setdefault((target, not moved), []).append(i)
        for (target, asking), indices in redirected.items():
            with self._lock:
                self.counters["redirects"] += len(indices)
            self._run({target: indices}, commands, replies, during, max(deadline, time.monotonic() + 0.001),
                      asking=asking)
        return replies

    def _run(self, groups: dict[Node, list[int]], commands: Sequence[tuple[Any, ...]], replies: list[Any],
             during: str, deadline: float, *, asking: bool) -> None:
        items = list(groups.items())
        if not items:
            return
        # Every node's pipeline at once on the pool, this thread waiting for them only until the deadline: the
        # socket timeout bounds each receive, not a reply (a server trickling a byte within each timeout would
        # hold a pipeline run here for as long as it likes). A pipeline given up on is ended by its node's fault.
        futures: list[Future[list[Any]]] = [
            self._pool.submit(self._pipeline, node, [commands[i] for i in indices], asking)
            for node, indices in items]
        results: list[list[Any] | BaseException] = []
        for future in futures:
            try:
                results.append(future.result(max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                results.append(redis.TimeoutError("no reply within the remote tier's timeout"))
            except Exception as exc:
                results.append(exc)
        for (node, indices), result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                self._fault(node, result, during)
                for i in indices:
                    replies[i] = result
            else:
                for i, reply in zip(indices, result, strict=True):
                    replies[i] = reply

    def _pipeline(self, node: Node, commands: Sequence[tuple[Any, ...]], asking: bool) -> list[Any]:
        pipe = node.client.pipeline(transaction=False)
        for command in commands:
            if asking:
                pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        out: list[Any] = pipe.execute(raise_on_error=False)
        return out[1::2] if asking else out

    # -- faults and returns -----------------------------------------------------------------------------

    def _fault(self, node: Node, exc: BaseException, during: str) -> None:
        with self._lock:
            self.counters["faults"] += 1
            if not node.up:
                return
            node.up = False
            delay_s = node.backoff_s
            node.retry_at = time.monotonic() + delay_s
            node.backoff_s = min(node.backoff_s * 2, self._max_s)
            tier_was_up, self._tier_up = self._tier_up, any(n.up for n in self._nodes.values())
        # A hung server answers later: its connections must not carry those replies to a later call.
        node.client.connection_pool.disconnect()
        if tier_was_up and not self._tier_up:
            _LOG.warning("remote tier down: %s failed (%s: %s); serving from the other tiers, retrying in %.1f s",
                         during, type(exc).__name__, exc, delay_s)
        else:
            _LOG.warning("remote node %s down: %s failed (%s: %s); its keys are misses, the other nodes serve "
                         "on; retrying in %.1f s", node.name, during, type(exc).__name__, exc, delay_s)

    def revive(self) -> float:
        """Refresh the slot map if due, ping the down nodes whose backoff expired, watch the up ones for
        restarts and evictions. Returns when it is next due (``time.monotonic()`` seconds)."""
        now = time.monotonic()
        with self._lock:
            due = [node for node in self._nodes.values() if not node.up and node.retry_at <= now]
        if self._cluster and (self._stale or due) and self._refresh_at <= now:
            self._refresh()
            with self._lock:
                due = [node for node in self._nodes.values() if not node.up and node.retry_at <= now]
        if due:
            self._ping(due)
        if now >= self._watch_at:
            self._watch_at = now + WATCH_S
            self._watch()
        with self._lock:
            waits = [node.retry_at for node in self._nodes.values() if not node.up]
            if self._cluster and (self._stale or not self._nodes):
                waits.append(self._refresh_at)
        return min([*waits, self._watch_at])

    def _probe(self, node: Node) -> None:
        """Raise unless ``node`` answers and, in a cluster, serves its slots (see the module promises)."""
        node.client.ping()
        if self._cluster:
            info = node.client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            if isinstance(info, dict):
                state = str(info.get("cluster_state", ""))
            else:
                text = info.decode() if isinstance(info, bytes) else str(info)
                state = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                              if line.startswith("cluster_state:")), "")
            if state != "ok":
                raise redis.ConnectionError(f"the node answers but is not serving yet (cluster_state:{state})")

    def _ping(self, nodes: list[Node]) -> None:
        futures = [self._pool.submit(self._probe, node) for node in nodes]
        deadline = time.monotonic() + self._wait_s
        for node, future in zip(nodes, futures, strict=True):
            try:
                future.result(max(0.0, deadline - time.monotonic()))
                error: BaseException | None = None
            except FutureTimeout:
                error = redis.TimeoutError("no reply to PING within the remote tier's timeout")
            except Exception as exc:
                error = exc
            self._settle(node, error)

    def _settle(self, node: Node, error: BaseException | None) -> None:
        """Record a ping's outcome on a down node (and log what changed)."""
        first = not self._started
        with self._lock:
            if error is not None:
                self.counters["faults"] += 1
                delay_s = node.backoff_s
                node.retry_at = time.monotonic() + delay_s
                node.backoff_s = min(node.backoff_s * 2, self._max_s)
            else:
                returned = node.retry_at > 0  # it failed before
                node.up = True
                node.backoff_s = self._min_s
                if returned:
                    self.counters["reconnects"] += 1
                    self.generation += 1  # it may have restarted empty
            tier_was_up, self._tier_up = self._tier_up, any(n.up for n in self._nodes.values())
        if error is not None:
            self._last_error = error
            node.client.connection_pool.disconnect()
            if not first:
                _LOG.debug("remote node %s still down (%s: %s); next try in %.1f s", node.name,
                           type(error).__name__, error, delay_s)
            return
        if not tier_was_up and self._tier_up:
            _LOG.info("remote tier %s: connected to %s (%s)", "up" if first else "back up",
                      ", ".join(redact(url) for url in self.config.urls), self.config.mode)
        elif returned:
            _LOG.info("remote node %s back up", node.name)

    def _refresh(self) -> None:
        """Ask the up nodes (else every known node and seed) for the slot map, all at once; the first
        well-formed answer wins. On no answer the map stays and the next try waits ``reconnect_min_ms``."""
        with self._lock:
            candidates = [node for node in self._nodes.values() if node.up]
            if not candidates:
                candidates = list(self._nodes.values())
                for options in self._seed_options:
                    candidates.append(self._node_locked(options, {}))
                candidates = list(dict.fromkeys(candidates))
        futures = [(node, self._pool.submit(node.client.execute_command, "CLUSTER", "SLOTS")) for node in candidates]
        deadline = time.monotonic() + self._wait_s
        ranges: list[tuple[int, int, str, int]] | None = None
        for node, future in futures:
            try:
                reply = future.result(max(0.0, deadline - time.monotonic()))
            except Exception:
                continue
            if ranges is None and isinstance(reply, list | dict):
                ranges = _slot_ranges(reply, node.name.rsplit(":", 1)[0])
        with self._lock:
            self.counters["topology_refreshes"] += 1
            if ranges is None:
                self._last_error = self._last_error or redis.ConnectionError("no node answered CLUSTER SLOTS with "
                                                                             "a slot map")
                self._refresh_at = time.monotonic() + self._min_s
                return
            self._install_locked(ranges)
            self._stale = False
            self._refresh_at = time.monotonic() + self._min_s

    def _install_locked(self, ranges: list[tuple[int, int, str, int]]) -> None:
        slots: list[Node | None] = [None] * SLOTS
        for first, last, host, port in ranges:
            node = self._node_locked(self._seed_options[0], {"host": host, "port": port})
            for slot in range(first, last + 1):
                slots[slot] = node
        self._slots = slots
        owners = {id(node) for node in slots if node is not None}
        for name in [name for name, node in self._nodes.items() if id(node) not in owners]:
            dropped = self._nodes.pop(name)
            dropped.client.close()
            dropped.watcher.close()

    def _watch(self) -> None:
        """Bump ``generation`` when an up node restarted or evicted keys since it was last watched."""
        with self._lock:
            nodes = [node for node in self._nodes.values() if node.up]
        futures = [self._pool.submit(self._info, node) for node in nodes]
        deadline = time.monotonic() + self._wait_s
        for node, future in zip(nodes, futures, strict=True):
            try:
                run_id, evicted = future.result(max(0.0, deadline - time.monotonic()))
            except (FutureTimeout, redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._fault(node, exc, "watch")
                continue
            except Exception:  # a server that refuses INFO (an ACL without it) or answers junk: no news from it
                continue
            with self._lock:
                if (node.run_id and run_id != node.run_id) or (node.evicted >= 0 and evicted > node.evicted):
                    self.generation += 1
                node.run_id, node.evicted = run_id, evicted

    @staticmethod
    def _info(node: Node) -> tuple[str, int]:
        """``node``'s run id and count of evicted keys, read here so that an answer without them raises where
        ``_watch`` takes it as no news, never out of the tier's start or the reviver."""
        pipe = node.watcher.pipeline(transaction=False)
        pipe.info("server")
        pipe.info("stats")
        server, stats = pipe.execute()
        return str(server.get("run_id", "")), int(stats.get("evicted_keys", 0))

    def start(self) -> None:
        """Reach the servers once (a single server's PING, a cluster's slot map and its nodes' PINGs); log
        the outcome."""
        self.revive()
        self._started = True
        if not self._tier_up:
            error = self._last_error
            _LOG.warning("remote tier down: connect failed (%s: %s); serving from the other tiers, retrying in %.1f s",
                         type(error).__name__, error, self._min_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            nodes, self._nodes = list(self._nodes.values()), {}
            self._tier_up = False
        for node in nodes:
            node.client.close()
            node.watcher.close()
