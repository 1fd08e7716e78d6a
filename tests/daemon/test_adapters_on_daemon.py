"""The transformers adapter runs on the daemon by configuration alone and shares its blocks across clients.

(The vLLM connector's twin is tests/connectors/test_vllm_daemon.py, in make test-vllm's environment.)
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier import Tier, open_store
from kvtier.config import config_from_mapping
from kvtier_connectors.transformers import TransformersConnector, kv_layout, random_model


def test_transformers_restores_what_another_client_saved(make_daemon: Any) -> None:
    model = random_model("llama")
    layout = kv_layout(model, 8)
    daemon = make_daemon(layout=False, pool="4MiB")  # serves the first hello's layout
    config = config_from_mapping({"daemon": {"connect": daemon.address}})
    prompt = torch.randint(0, 512, (1, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(prompt).logits[:, -1]
    with open_store(layout, config) as first:
        saved = TransformersConnector(model, first).prefill(prompt)
        assert saved.restored_tokens == 0 and saved.saved_blocks >= 1
    with open_store(layout, config) as second:  # a new client: a new engine process, say
        restored = TransformersConnector(model, second).prefill(prompt)
    assert restored.restored_tokens >= 8 and set(restored.tiers) == {Tier.HOST}
    assert torch.equal(restored.logits[:, -1], expected)
