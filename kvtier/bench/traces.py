"""Seeded generators of request traces in the replay's format (``kvtier.replay``), by workload shape.

Each shape is built from a description of how an application reuses prompts, not fitted to any trace:

- ``chat``: multi-turn conversations behind a few shared system prompts, turns about a minute apart, each
  turn appending the last answer and the next question; a third are one-turn chats.
- ``agent``: tenants' agents behind tool-definition prefixes, tool loops a few seconds a step, each step
  appending a tool result; some tasks retry from an earlier step.
- ``rag``: questions over Zipf-popular passages (the most relevant first) behind one system prompt, some
  with a follow-up turn.
- ``coding``: tenants' shared repository contexts of 20-120 blocks edited a few times an hour (every block
  after an edit point changes), sessions of turns about a minute apart growing a history, short chats.
- ``batch``: chat traffic plus a batch job every half hour that scans a few hundred one-time documents
  behind one instruction.
- ``day``: all of the above over a working day's rate curve (quiet night, morning and afternoon peaks).

Promises:
- ``generate(shape, seed)`` is deterministic: the same shape and seed give the same requests, in every
  process (``random.Random`` seeded, no ``hash()``).
- Ids are chained prefix hashes remapped to small integers, as in the shared Mooncake trace: the same id is
  the same block with the same whole prefix; requests are sorted by timestamp (milliseconds).
- ``write_trace`` writes one JSON object a line with ``timestamp``, ``input_length`` (``512 x`` blocks),
  ``output_length`` and ``hash_ids``; ``load_trace`` reads it back unchanged.
- An unknown shape raises ``ConfigError``. Sizes are small (a few tens of thousands of unique blocks) so
  a replay table of every shape runs in minutes.
"""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.replay import TRACE_BLOCK_TOKENS, Trace

HOUR = 3600.0
# A request: (arrival in seconds, the content labels of its blocks, first to last).
Request = tuple[float, tuple[int, ...]]


class _Labels:
    """Fresh content labels (a block's text) and chained prefix ids (a block's text and whole prefix)."""

    def __init__(self) -> None:
        self._next = 0
        self._ids: dict[tuple[int, int], int] = {}

    def fresh(self, n: int = 1) -> tuple[int, ...]:
        first, self._next = self._next, self._next + n
        return tuple(range(first, first + n))

    def chain(self, labels: tuple[int, ...]) -> list[int]:
        ids, parent = [], -1
        for label in labels:
            parent = self._ids.setdefault((parent, label), len(self._ids))
            ids.append(parent)
        return ids


def _arrivals(rng: random.Random, per_hour: float, hours: float, curve: Callable[[float], float]) -> Iterator[float]:
    """Poisson arrivals of ``per_hour`` at the curve's peak (1.0), thinned by ``curve(hour)``."""
    t = 0.0
    while True:
        t += rng.expovariate(per_hour / HOUR)
        if t >= hours * HOUR:
            return
        if rng.random() < curve(t / HOUR):
            yield t


def _flat(_hour: float) -> float:
    return 1.0


def _working_day(hour: float) -> float:
    """Requests over a day starting at midnight: a tenth at night, peaks at 11:00 and 15:00."""
    return min(1.0, 0.1 + 0.9 * math.exp(-((hour - 11) / 2.5) ** 2) + 0.8 * math.exp(-((hour - 15.5) / 2.5) ** 2))


def _zipf(rng: random.Random, n: int, s: float) -> Callable[[], int]:
    """Draws ranks ``0..n-1`` with probability proportional to ``1 / (rank + 1) ** s``."""
    weights = [1 / (rank + 1) ** s for rank in range(n)]
    cumulative, total = [], 0.0
    for weight in weights:
        total += weight
        cumulative.append(total)
    return lambda: min(n - 1, bisect.bisect_left(cumulative, rng.random() * total))


def _chats(rng: random.Random, labels: _Labels, per_hour: float, hours: float,
           curve: Callable[[float], float]) -> Iterator[Request]:
    prompts = [labels.fresh(rng.randint(1, 3)) for _ in range(6)]
    pick = _zipf(rng, len(prompts), 1.2)
    for start in _arrivals(rng, per_hour, hours, curve):
        history, t = prompts[pick()] + labels.fresh(rng.randint(1, 4)), start
        turns = 1 if rng.random() < 0.5 else 2 + int(rng.expovariate(1 / 3))
        for _ in range(turns):
            yield t, history
            history += labels.fresh(rng.randint(1, 3))
            # Most turns come about a minute apart; some users come back after a long pause.
            t += rng.expovariate(1 / 60) if rng.random() < 0.8 else rng.expovariate(1 / 900)


def _agents(rng: random.Random, labels: _Labels, per_hour: float, hours: float,
            curve: Callable[[float], float]) -> Iterator[Request]:
    tools = [labels.fresh(rng.randint(4, 12)) for _ in range(16)]
    pick = _zipf(rng, len(tools), 0.8)
    for start in _arrivals(rng, per_hour, hours, curve):
        steps, t = [tools[pick()] + labels.fresh(rng.randint(1, 2))], start
        for _ in range(rng.randint(3, 15)):
            yield t, steps[-1]
            t += rng.expovariate(1 / 5)
            # A retry goes back a few steps and takes another path from there.
            base = steps[max(0, len(steps) - rng.randint(2, 4))] if rng.random() < 0.1 else steps[-1]
            steps.append(base + labels.fresh(1))


def _rag(rng: random.Random, labels: _Labels, per_hour: float, hours: float,
         curve: Callable[[float], float]) -> Iterator[Request]:
    system = labels.fresh(1)
    passages = [labels.fresh(rng.randint(1, 2)) for _ in range(3000)]
    pick = _zipf(rng, len(passages), 1.0)
    for start in _arrivals(rng, per_hour, hours, curve):
        chosen: list[int] = []
        while len(chosen) < rng.randint(3, 5):
            passage = pick()
            if passage not in chosen:
                chosen.append(passage)
        prompt = system + tuple(label for passage in chosen for label in passages[passage]) + labels.fresh(1)
        yield start, prompt
        if rng.random() < 0.3:
            yield start + rng.expovariate(1 / 60), prompt + labels.fresh(2)


def _coding(rng: random.Random, labels: _Labels, per_hour: float, hours: float,
            curve: Callable[[float], float]) -> Iterator[Request]:
    system = labels.fresh(2)
    repos = [labels.fresh(rng.randint(20, 120)) for _ in range(12)]
    # Each repository's edits: (time, edit point); an edit changes every block after its point.
    edits = [sorted((rng.uniform(0, hours * HOUR), rng.randrange(len(repo))) for _ in range(int(3 * hours)))
             for repo in repos]
    versions: list[dict[float, tuple[int, ...]]] = []
    for repo, repo_edits in zip(repos, edits, strict=True):
        current, by_time = repo, {0.0: repo}
        for when, point in repo_edits:
            current = current[:point] + labels.fresh(len(current) - point)
            by_time[when] = current
        versions.append(by_time)
    pick = _zipf(rng, len(repos), 0.7)

    def repo_at(tenant: int, t: float) -> tuple[int, ...]:
        return versions[tenant][max(when for when in versions[tenant] if when <= t)]

    for start in _arrivals(rng, per_hour, hours, curve):
        tenant, t = pick(), start
        history = labels.fresh(1)
        for _ in range(1 + int(rng.expovariate(1 / 4))):
            yield t, system + repo_at(tenant, t) + history
            history += labels.fresh(rng.randint(1, 2))
            t += rng.expovariate(1 / 60)


def _scans(rng: random.Random, labels: _Labels, hours: float, documents: int) -> Iterator[Request]:
    instruction = labels.fresh(1)
    for job in range(int(hours * 2)):
        t = job * HOUR / 2 + rng.uniform(0, 60)
        for _ in range(documents):
            yield t, instruction + labels.fresh(rng.randint(2, 6))
            t += rng.expovariate(1 / 0.5)


def _requests(shape: str, rng: random.Random, labels: _Labels) -> Iterator[Request]:
    if shape == "chat":
        yield from _chats(rng, labels, 900, 4, _flat)
    elif shape == "agent":
        yield from _agents(rng, labels, 150, 4, _flat)
        yield from _chats(rng, labels, 150, 4, _flat)
    elif shape == "rag":
        yield from _rag(rng, labels, 2500, 4, _flat)
    elif shape == "coding":
        yield from _coding(rng, labels, 50, 4, _flat)
        yield from _chats(rng, labels, 300, 4, _flat)
    elif shape == "batch":
        yield from _chats(rng, labels, 500, 4, _flat)
        yield from _scans(rng, labels, 4, 300)
    elif shape == "day":
        yield from _coding(rng, labels, 12, 24, _working_day)
        yield from _chats(rng, labels, 150, 24, _working_day)
        yield from _agents(rng, labels, 15, 24, _working_day)
        yield from _rag(rng, labels, 250, 24, _working_day)
        yield from _scans(rng, labels, 24, 60)
    else:
        raise ConfigError(f"unknown trace shape {shape!r}; choose one of {list(SHAPES)}")


SHAPES = ("chat", "agent", "rag", "coding", "batch", "day")


def generate(shape: str, seed: int = 0) -> tuple[Trace, list[int]]:
    """The ``shape``'s trace for ``seed``, and each request's output tokens (see the module docstring)."""
    rng = random.Random(f"{shape}:{seed}")
    labels = _Labels()
    requests = sorted(_requests(shape, rng, labels), key=lambda request: request[0])
    return (Trace([labels.chain(blocks) for _, blocks in requests], [round(t * 1000, 3) for t, _ in requests]),
            [rng.randint(50, 800) for _ in requests])


def write_trace(path: str | Path, trace: Trace, output_lengths: list[int]) -> None:
    """Write ``trace`` in the Mooncake format (one JSON object a line)."""
    with open(path, "w") as out:
        for timestamp, ids, output in zip(trace.timestamps_ms, trace.requests, output_lengths, strict=True):
            out.write(json.dumps({"timestamp": timestamp, "input_length": TRACE_BLOCK_TOKENS * len(ids),
                                  "output_length": output, "hash_ids": ids}) + "\n")


__all__ = ["SHAPES", "generate", "write_trace"]
