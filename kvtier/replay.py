"""Trace replay: the store's tiering decisions run over a request trace, without payload bytes.

A trace is the Mooncake format (one JSON object a line; ``hash_ids``: chained prefix hashes of the request's
blocks, so an id names a block and its whole prefix). Each request is replayed as the store serves it:

1. Lookup: the request's leading run of blocks present in host RAM or on disk are hits (host first); a disk
   hit is read into host RAM (promotion) and keeps its disk copy, unless the admission policy said
   ``exclusive`` when the request arrived: then the disk drops it (``DiskTier.moved_to_host``). Every block
   referenced, hit or not, is reported to the admission policy (``on_access``), in request order.
2. Then the request's blocks are referenced deepest first: a block in host RAM is touched, any other is
   put into host RAM (recomputed, or promoted from disk), evicting as the host policy chooses. An evicted
   block the disk does not hold is offered to the disk and written if admission says so (write-back).

The disk is a region log: blocks are appended to an open region of ``blocks_per_region`` blocks (fewer on a
disk of less than ``min_regions`` regions: ``disk_blocks // min_regions``, at least one, as the store's tier
shrinks its regions, ``DiskConfig.scaled_region_bytes``); when
every region is used, the oldest sealed region is evicted whole, and each of its blocks read from disk at
least ``reinsert_hits`` times since written is appended again (a write) instead of dropped (0: never),
unless host RAM holds it then (``left_to_host``): host and disk mostly hold different blocks, and the
host's eviction offers the block again when it leaves RAM. A block dropped at the hit (``exclusive``)
leaves a dead slot until its region goes, unless the region is sealed and left without a live block:
then it is free at once (``regions_freed``), as in the store's tier.

With a ``DriveModel`` the replay has a clock: request ``i`` arrives at its trace timestamp (times
``time_scale``), its evictions happen at that instant (the engine puts at memory speed), and an admitted
block goes through what the store's disk tier does with a demotion (``kvtier.disk.tier``): it is charged to
the write budget (a token bucket that accrues the budget over time and holds ``budget_burst_s`` seconds of
it, full at the start; over it: dropped, ``dropped_over_budget``), then
queued in the write-back buffer, which the drive drains at ``write_bytes_per_s`` (no room: dropped,
``dropped_buffer_full``). A dropped block is not on disk. Reinsertions are writes too: charged and queued,
never refused. The buffer is modelled as a fluid (it drains continuously); the tier drains it a region at
a time, so it may refuse up to one region earlier.

Single-tier baselines replay the same trace through one cache that admits everything (LRU, S3-FIFO, ARC)
and through Belady's offline optimum with bypass (evict, or skip caching, the block referenced furthest in
the future), in the same lookup-then-deepest-first order; they reproduce the reference hit ratios of
``data/README.md``.

Promises:
- Uses kvtier's own policies (``kvtier.policies``) and admission (``kvtier.disk.admission``); nothing here
  looks at the future except ``replay_belady``, which is the offline baseline.
- ``load_trace`` raises ``InvalidInputError`` naming the file (and the line, for a malformed line); sizes
  and names out of range raise ``ConfigError``.
- A block hit ratio is hit blocks over referenced blocks; host and disk hit ratios add up to it.
- Deterministic: the same trace and settings give the same result; a clocked replay uses the trace's
  timestamps, never the wall clock.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.config import DiskConfig
from kvtier.disk.admission import AdmissionPolicy, make_admission
from kvtier.errors import ConfigError, InvalidInputError
from kvtier.policies import make_policy

TRACE_BLOCK_TOKENS = 512
# Replay's default region: 16 blocks. The store's regions are 64 MiB (DiskConfig.region_bytes): 16 blocks
# of 4 MiB; the hit ratios barely depend on it as long as a region is a small share of the disk.
DEFAULT_BLOCKS_PER_REGION = 16


@dataclass(frozen=True)
class Trace:
    """A trace's requests as lists of block ids, deepest last, and their arrival times in milliseconds
    (empty when the trace has none)."""

    requests: list[list[int]]
    timestamps_ms: list[float] = field(default_factory=list)

    @property
    def unique_blocks(self) -> int:
        return len({block for request in self.requests for block in request})

    @property
    def referenced_blocks(self) -> int:
        return sum(len(request) for request in self.requests)


def load_trace(path: str | Path, block_tokens: int = TRACE_BLOCK_TOKENS,
               trace_block_tokens: int = TRACE_BLOCK_TOKENS) -> Trace:
    """Read a Mooncake-format trace; blocks of ``block_tokens`` are made of whole trace blocks.

    A block of ``k`` trace blocks is named by the last id in it: the ids are chained prefix hashes, so the
    last one names the whole prefix. A request's trailing partial group is a block of its own.
    """
    if block_tokens < 1 or block_tokens % trace_block_tokens:
        raise ConfigError(f"block_tokens must be a positive multiple of the trace's {trace_block_tokens}-token "
                          f"blocks, got {block_tokens}")
    group = block_tokens // trace_block_tokens
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidInputError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    requests: list[list[int]] = []
    timestamps: list[float | None] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        ids, timestamp = _parse_line(line, path, line_number)
        requests.append(ids[group - 1::group] + ([ids[-1]] if len(ids) % group else []))
        timestamps.append(timestamp)
    if not requests:
        raise InvalidInputError(f"trace {path} has no requests")
    # A trace with a line without a timestamp has no clock: a clocked replay of it is refused.
    times = [t for t in timestamps if t is not None]
    return Trace(requests, times if len(times) == len(timestamps) else [])


def _parse_line(line: str, path: str | Path, line_number: int) -> tuple[list[int], float | None]:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}: not a JSON object: {exc.msg}") from None
    if not isinstance(record, dict) or "hash_ids" not in record:
        raise InvalidInputError(f"{where}: expected an object with 'hash_ids'")
    ids = record["hash_ids"]
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise InvalidInputError(f"{where}: 'hash_ids' must be a non-empty list of integers")
    timestamp = record.get("timestamp")
    if timestamp is None:
        return ids, None
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not math.isfinite(timestamp):
        raise InvalidInputError(f"{where}: 'timestamp' must be a number of milliseconds, got {timestamp!r}")
    return ids, float(timestamp)


class RegionLog:
    """The disk tier's index and space: a FIFO of regions with hits-based reinsertion (module docstring)."""

    def __init__(self, capacity_blocks: int, blocks_per_region: int = DEFAULT_BLOCKS_PER_REGION,
                 reinsert_hits: int = DiskConfig.reinsert_hits, held_above: Container[int] = ()) -> None:
        if capacity_blocks < 1 or blocks_per_region < 1 or reinsert_hits < 0:
            raise ConfigError(f"a region log needs capacity_blocks >= 1, blocks_per_region >= 1 and "
                              f"reinsert_hits >= 0, got {capacity_blocks}, {blocks_per_region}, {reinsert_hits}")
        # A disk smaller than one region is one region: it still holds capacity_blocks.
        self.blocks_per_region = min(blocks_per_region, capacity_blocks)
        self.num_regions = capacity_blocks // self.blocks_per_region
        self.reinsert_hits = reinsert_hits
        self.held_above = held_above
        self._where: dict[int, int] = {}
        self._reads: dict[int, int] = {}
        self._sealed: dict[int, list[int]] = {}
        self._live: dict[int, int] = {}
        self._open: list[int] = []
        self._open_id = 0
        self.blocks_written = 0
        self.blocks_reinserted = 0
        self.left_to_host = 0
        self.blocks_moved_to_host = 0
        self.regions_freed = 0

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def read(self, key: int) -> None:
        """Count a read of a stored ``key`` (a disk hit) towards its reinsertion."""
        self._reads[key] += 1

    def drop(self, key: int) -> None:
        """Forget a stored ``key`` (it moved to host RAM); a sealed region left without a live block is free."""
        region = self._where.pop(key)
        del self._reads[key]
        self.blocks_moved_to_host += 1
        self._live[region] -= 1
        if not self._live[region] and region in self._sealed:
            del self._sealed[region]
            del self._live[region]
            self.regions_freed += 1

    def write(self, key: int) -> int:
        """Append ``key`` (not stored), evicting the oldest region first if every region is used; returns the
        blocks written, reinsertions included."""
        before = self.blocks_written
        while len(self._open) >= self.blocks_per_region:
            self._seal()
        self._append(key)
        return self.blocks_written - before

    def _append(self, key: int) -> None:
        self._where[key] = self._open_id
        self._live[self._open_id] = self._live.get(self._open_id, 0) + 1
        self._reads[key] = 0
        self._open.append(key)
        self.blocks_written += 1

    def _seal(self) -> None:
        if self._live.get(self._open_id):
            self._sealed[self._open_id] = self._open
        else:  # every block left it while it was open: free once written
            self._live.pop(self._open_id, None)
            self.regions_freed += 1
        self._open_id += 1
        self._open = []
        if len(self._sealed) < self.num_regions:
            return
        region_id = next(iter(self._sealed))
        keys = self._sealed.pop(region_id)
        del self._live[region_id]
        for key in keys:
            if self._where.get(key) != region_id:
                continue  # reinserted since: this slot is stale
            hot = self.reinsert_hits and self._reads[key] >= self.reinsert_hits
            if hot and key in self.held_above:
                self.left_to_host += 1
                hot = False
            if hot:
                # Reinsertion fits: the open region is empty and a region's keys fill at most one.
                self.blocks_reinserted += 1
                self._append(key)
            else:
                del self._where[key]
                del self._reads[key]


@dataclass(frozen=True)
class DriveModel:
    """The drive under a clocked replay (module docstring): the bytes of a block, the drive's write
    bandwidth, the write-back buffer, the write budget (0: none), the factor applied to trace time and the
    seconds of budget the bucket holds (``DiskConfig.write_budget_burst_s``)."""

    block_bytes: int
    write_bytes_per_s: float
    writeback_buffer_bytes: int
    budget_bytes_per_s: float = 0.0
    time_scale: float = 1.0
    budget_burst_s: float = DiskConfig.write_budget_burst_s

    def __post_init__(self) -> None:
        finite = all(math.isfinite(value) for value in (self.write_bytes_per_s, self.budget_bytes_per_s,
                                                         self.time_scale, self.budget_burst_s))
        if (not finite or self.block_bytes < 1 or self.write_bytes_per_s <= 0 or self.writeback_buffer_bytes < 0
                or self.budget_bytes_per_s < 0 or self.time_scale <= 0 or self.budget_burst_s < 0):
            raise ConfigError(f"a drive model needs block_bytes >= 1, write_bytes_per_s > 0, "
                              f"writeback_buffer_bytes >= 0, budget_bytes_per_s >= 0, time_scale > 0 and "
                              f"budget_burst_s >= 0, got {self}")


class _Drive:
    """A ``DriveModel``'s state: the buffer's backlog and the budget's tokens at the time of the last call."""

    def __init__(self, model: DriveModel) -> None:
        self.model = model
        self.now_s = 0.0
        self.backlog_bytes = 0.0
        # The tier's bucket (kvtier.disk.tier._TokenBucket): budget_burst_s of budget, at least one block.
        self.burst_bytes = max(model.budget_bytes_per_s * model.budget_burst_s, float(model.block_bytes))
        self.tokens = self.burst_bytes
        self.dropped_buffer_full = 0
        self.dropped_over_budget = 0

    def advance(self, timestamp_ms: float) -> None:
        now_s = max(self.now_s, timestamp_ms / 1000 * self.model.time_scale)  # time never runs backwards
        elapsed_s, self.now_s = now_s - self.now_s, now_s
        self.backlog_bytes = max(0.0, self.backlog_bytes - elapsed_s * self.model.write_bytes_per_s)
        self.tokens = min(self.burst_bytes, self.tokens + elapsed_s * self.model.budget_bytes_per_s)

    def accept(self) -> bool:
        """Whether a demoted block gets written; a refusal is counted by cause, in the tier's order."""
        block = self.model.block_bytes
        if self.backlog_bytes + block > self.model.writeback_buffer_bytes:
            self.dropped_buffer_full += 1
            return False
        if self.model.budget_bytes_per_s and self.tokens < block:
            self.dropped_over_budget += 1
            return False
        return True

    def write(self, blocks: int) -> None:
        nbytes = blocks * self.model.block_bytes
        self.backlog_bytes += nbytes
        if self.model.budget_bytes_per_s:
            self.tokens -= nbytes


@dataclass(frozen=True)
class TieredResult:
    requests: int
    referenced_blocks: int
    host_hits: int
    disk_hits: int
    disk_blocks_written: int
    disk_blocks_reinserted: int
    disk_offers: int
    disk_admitted: int
    # Read blocks a region eviction did not reinsert because host RAM held them then.
    disk_left_to_host: int = 0
    # Blocks read into host RAM that left the disk then (the admission ran it exclusive of host RAM).
    disk_moved_to_host: int = 0
    # Admitted blocks a clocked replay could not write (zero without a clock).
    dropped_buffer_full: int = 0
    dropped_over_budget: int = 0

    @property
    def host_hit_ratio(self) -> float:
        return self.host_hits / self.referenced_blocks

    @property
    def disk_hit_ratio(self) -> float:
        return self.disk_hits / self.referenced_blocks

    @property
    def block_hit_ratio(self) -> float:
        return (self.host_hits + self.disk_hits) / self.referenced_blocks


def replay_tiered(trace: Trace, host_blocks: int, disk_blocks: int, *, policy: str = "s3fifo",
                  admission: str | AdmissionPolicy = "adaptive",
                  blocks_per_region: int = DEFAULT_BLOCKS_PER_REGION, reinsert_hits: int = DiskConfig.reinsert_hits,
                  drive: DriveModel | None = None, min_regions: int = DiskConfig.min_regions) -> TieredResult:
    """Replay ``trace`` through host RAM (``policy``) over a region-log disk (0 blocks: no disk tier), on the
    trace's clock through ``drive`` if given."""
    if host_blocks < 1 or disk_blocks < 0:
        raise ConfigError(f"host_blocks must be >= 1 and disk_blocks >= 0, got {host_blocks} and {disk_blocks}")
    if min_regions < 1:
        raise ConfigError(f"min_regions must be >= 1, got {min_regions}")
    if drive is not None and len(trace.timestamps_ms) != len(trace.requests):
        raise ConfigError("a clocked replay needs a trace with a timestamp on every request")
    clock = _Drive(drive) if drive is not None and disk_blocks else None
    host = make_policy(policy, host_blocks)
    region_blocks = max(1, min(blocks_per_region, disk_blocks // min_regions))
    disk = RegionLog(disk_blocks, region_blocks, reinsert_hits, host) if disk_blocks else None
    admit: AdmissionPolicy | None = None
    if disk_blocks:
        admit = make_admission(admission, disk_blocks, region_blocks) if isinstance(admission, str) else admission
    elif isinstance(admission, str):
        make_admission(admission, 1)  # an unknown name is an error even without a disk tier
    host_hits = disk_hits = offers = admitted = 0
    for number, request in enumerate(trace.requests):
        if clock is not None:
            clock.advance(trace.timestamps_ms[number])
        exclusive = admit is not None and admit.exclusive
        run = 0
        for key in request:
            if key in host:
                host_hits += 1
            elif disk is not None and key in disk:
                disk_hits += 1
                disk.read(key)
                if exclusive:
                    disk.drop(key)
            else:
                break
            run += 1
        if admit is not None:
            for position, key in enumerate(request):
                admit.on_access(key, position < run)
        for key in reversed(request):
            if key in host:
                host.touch(key)
                continue
            if len(host) >= host_blocks:
                for victim in host.evict(1):
                    if disk is None or admit is None or victim in disk:
                        continue
                    offers += 1
                    if admit.admit(victim):
                        admitted += 1
                        if clock is None:
                            disk.write(victim)
                        elif clock.accept():
                            clock.write(disk.write(victim))
            host.insert(key)
    return TieredResult(len(trace.requests), trace.referenced_blocks, host_hits, disk_hits,
                        disk.blocks_written if disk else 0, disk.blocks_reinserted if disk else 0, offers, admitted,
                        disk.left_to_host if disk else 0, disk.blocks_moved_to_host if disk else 0,
                        clock.dropped_buffer_full if clock else 0, clock.dropped_over_budget if clock else 0)


def _leading_run(request: Sequence[int], present: Container[int]) -> int:
    """How many of ``request``'s blocks, from the first, are all ``present``: the prefix a lookup finds."""
    for count, key in enumerate(request):
        if key not in present:
            return count
    return len(request)


def replay_single(trace: Trace, capacity: int, policy: str) -> float:
    """Block hit ratio of one cache of ``capacity`` blocks that admits everything, under ``policy``."""
    cache = make_policy(policy, capacity)
    hits = 0
    for request in trace.requests:
        hits += _leading_run(request, cache)
        for key in reversed(request):
            if key in cache:
                cache.touch(key)
                continue
            if len(cache) >= capacity:
                cache.evict(1)
            cache.insert(key)
    return hits / trace.referenced_blocks


def _next_uses(requests: Sequence[Sequence[int]]) -> list[float]:
    """For each reference in replay order (deepest first per request), when its block is next referenced."""
    order = [key for request in requests for key in reversed(request)]
    next_use: list[float] = [math.inf] * len(order)
    seen: dict[int, int] = {}
    for position in range(len(order) - 1, -1, -1):
        key = order[position]
        if key in seen:
            next_use[position] = seen[key]
        seen[key] = position
    return next_use


def replay_belady(trace: Trace, capacity: int) -> float:
    """Block hit ratio of Belady's offline optimum with bypass: the upper bound for ``capacity`` blocks."""
    if capacity < 1:
        raise ConfigError(f"capacity must be at least 1 block, got {capacity}")
    next_use = _next_uses(trace.requests)
    cached: dict[int, float] = {}
    # Max-heap on next use with lazy deletion: an entry is live only while it matches cached[key].
    heap: list[tuple[float, int]] = []
    hits = 0
    position = 0
    for request in trace.requests:
        hits += _leading_run(request, cached)
        for key in reversed(request):
            upcoming = next_use[position]
            position += 1
            if key in cached:
                cached[key] = upcoming
                heapq.heappush(heap, (-upcoming, key))
                continue
            if upcoming == math.inf:
                continue
            if len(cached) >= capacity:
                while cached.get(heap[0][1]) != -heap[0][0]:
                    heapq.heappop(heap)
                furthest, victim = heap[0]
                if -furthest <= upcoming:
                    continue  # bypass: every cached block is needed sooner than this one
                heapq.heappop(heap)
                del cached[victim]
            cached[key] = upcoming
            heapq.heappush(heap, (-upcoming, key))
    return hits / trace.referenced_blocks


__all__ = ["DEFAULT_BLOCKS_PER_REGION", "DriveModel", "RegionLog", "Trace", "TieredResult", "load_trace",
           "replay_belady", "replay_single", "replay_tiered"]
