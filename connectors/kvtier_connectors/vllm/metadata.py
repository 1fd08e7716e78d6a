"""``KvtierMetadata``: the step plan of ``kvtier_connectors.vllm.specs`` as vLLM's connector metadata.

Promises:
- It is a ``StepPlan`` (loads, saves, key epoch) and a ``KVConnectorMetadata``; vLLM pickles it to workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from kvtier_connectors.vllm.specs import StepPlan


@dataclass
class KvtierMetadata(StepPlan, KVConnectorMetadata):
    """One step's loads and saves."""
