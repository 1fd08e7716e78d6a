"""``KvtierMetadata`` and ``KvtierWorkerMeta``: the connector's messages through vLLM, each way.

Promises:
- ``KvtierMetadata`` is a ``StepPlan`` (loads, saves, key epoch, step number, verdicts) and a
  ``KVConnectorMetadata``; vLLM pickles it to workers.
- ``KvtierWorkerMeta`` names the step a worker just ran, and the keys it committed and those it staged or
  planned but did not commit since its last report; vLLM merges the ranks' (``aggregate`` keeps the smallest
  step and every rank's keys) and hands it, with the merged load errors of that step, to the scheduler side.
  It is never empty, so vLLM reports every step's output to ``update_connector_output``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from kvtier_connectors.vllm.specs import StepPlan


@dataclass
class KvtierMetadata(StepPlan, KVConnectorMetadata):
    """One step's loads and saves, and the verdicts on earlier steps' saves."""


@dataclass
class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """The step (``StepPlan.step``) whose output this is, and the commit reports of every rank."""

    step: int
    # (step of the save, key) pairs: see ``WorkerSide.take_commit_reports``.
    committed: tuple[tuple[int, bytes], ...] = ()
    lost: tuple[tuple[int, bytes], ...] = ()

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KvtierWorkerMeta):
            return KvtierWorkerMeta(min(self.step, other.step), self.committed + other.committed,
                                    self.lost + other.lost)
        return self
