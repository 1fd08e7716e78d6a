"""What the scheduler side tells the workers each step, as plain data that needs no vLLM to import.

Promises:
- A chunk is one kvtier block: ``pages_per_chunk`` consecutive vLLM blocks of every layer. Specs name chunks
  by vLLM's chained hash of their last hash block (``chunk_hashes``); each worker maps those to its own
  rank's keys, so one plan serves every rank.
- A ``SaveSpec``'s ``block_ids`` lists ``pages_per_chunk`` vLLM block ids per chunk, in token order.
- A ``LoadSpec`` restores its chunks' pages ``first_page, first_page + 1, ...`` into ``block_ids[0], [1], ...``
  (vLLM may already hold the leading pages of the first chunk; a load always ends on a chunk boundary).
- ``StepPlan.key_epoch`` names the generation of the keys: ``reset_cache`` starts a new one, so that KV saved
  before a reset (e.g. under old weights) is never found after it.
- ``StepPlan.step`` numbers the plans from 1; ``StepPlan.verdicts`` settle the saves of earlier steps (the
  commit rule): a ``Verdict`` names a step whose output the scheduler has read (merged over every rank) and
  the chunks of that step's saves that were computed over KV that failed to load; every other chunk the step
  saved is committed.
- Specs are plain data (picklable): vLLM sends the plan to worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadSpec:
    req_id: str
    chunk_hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]
    first_page: int
    is_async: bool


@dataclass(frozen=True)
class SaveSpec:
    req_id: str
    chunk_hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Verdict:
    step: int
    dropped: frozenset[bytes] = frozenset()


@dataclass
class StepPlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    key_epoch: str = ""
    step: int = 0
    verdicts: list[Verdict] = field(default_factory=list)
