"""One real vLLM engine (offline ``LLM``) for the engine suite, run as its own process.

``python vllm_engine_child.py SPEC.json`` builds an ``LLM`` over the spec's model, with kvtier's connector when
the spec has ``extra`` (``kv_connector_extra_config``), runs the spec's phases one request at a time (greedy),
and prints one JSON line ``RESULT {...}``: per request the generated token ids, vLLM's ``num_cached_tokens``
(the connector's hits: prefix caching is off) and the request's wall time; the engine's id; kvtier's store
statistics where the spec says where to read them (``stats``: ``"embedded"`` for the store of this process,
``"engine"`` for the engine's private daemon, or a daemon socket path).

``drop_after_lookup`` (in-process engines only): the connector's store is a ``Store`` that deletes the chosen
chunk of the first lookup that finds at least that many chunks, right after answering it, so the load that
follows misses a block the scheduler was promised. ``async_scheduling`` turns vLLM's async scheduling on,
which its CPU platform otherwise turns off (in the configuration the engine core gets, in process or not;
the result's ``async_scheduling`` says what the engine ran with). ``tensor_parallel_size`` runs that many
worker processes (the caller binds their threads: ``VLLM_CPU_OMP_THREADS_BIND``). ``switch_interval`` sets
the interpreter's switch interval once the engine is built (for measurements). ``verify_kv`` (in-process
engines only) checks every copy between vLLM's paged KV and kvtier's slots as it happens: after each save's
gather and each load's scatter, the pages are gathered again and compared with the slot's bytes
(``torch.equal``), counted in the result's ``kv_checks``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, ClassVar


def _dropping_store(spec: dict[str, Any], layout: Any) -> Any:
    from kvtier.config import config_from_mapping
    from kvtier.store import Store

    chunk = int(spec["drop_after_lookup"])

    class DroppingStore(Store):
        dropped: ClassVar[list[str]] = []

        def lookup(self, keys: Any, *, prefetch: bool = True, scope: str | None = None) -> Any:
            found = super().lookup(keys, prefetch=prefetch, scope=scope)
            if not self.dropped and found.num_blocks > chunk:
                key = list(keys)[chunk]
                with self._lock:
                    if self.host.drop(key):
                        self.dropped.append(key.hex())
            return found

    return DroppingStore(layout, config_from_mapping(spec["extra"].get("config", {})))


KV_CHECKS = {"saved_chunks": 0, "loaded_chunks": 0, "mismatched_chunks": 0}


def _verify_kv_copies() -> None:
    """Wrap ``PagedKV``'s slot copies so that each one is checked against the pages right after it ran."""
    import torch

    from kvtier.native import PagedKV

    def mismatches(paged: Any, block_ids: Any, rows: Any, slot_ids: Any, pages_per_chunk: int,
                   segments: range | None) -> tuple[int, int]:
        ids = torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1)
        slots = torch.as_tensor(slot_ids, dtype=torch.int64).reshape(-1).tolist()
        chosen = range(paged.num_segments) if segments is None else segments
        staging = torch.zeros(ids.numel() * paged.num_segments * paged.page_bytes, dtype=torch.uint8)
        paged.gather(ids, staging, pages_per_chunk, chosen)
        width = pages_per_chunk * paged.page_bytes
        pages = staging.view(len(slots), paged.num_segments, width)[:, chosen.start:chosen.stop]
        stored = [rows[slot, : paged.chunk_bytes(pages_per_chunk)].view(paged.num_segments, width)
                  [chosen.start:chosen.stop] for slot in slots]
        return len(slots), sum(not torch.equal(page, row.cpu()) for page, row in zip(pages, stored, strict=True))

    def checked(copy: Any, counter: str) -> Any:
        def wrapper(self: Any, block_ids: Any, rows: Any, slot_ids: Any, pages_per_chunk: int = 1,
                    segments: range | None = None) -> None:
            copy(self, block_ids, rows, slot_ids, pages_per_chunk, segments)
            count, wrong = mismatches(self, block_ids, rows, slot_ids, pages_per_chunk, segments)
            KV_CHECKS[counter] += count
            KV_CHECKS["mismatched_chunks"] += wrong
        return wrapper

    PagedKV.gather_to_slots = checked(PagedKV.gather_to_slots, "saved_chunks")  # type: ignore[method-assign]
    PagedKV.scatter_from_slots = checked(PagedKV.scatter_from_slots, "loaded_chunks")  # type: ignore[method-assign]


def _install_hooks(spec: dict[str, Any]) -> list[Any]:
    """Patches for an in-process engine; returns the stores it adopted."""
    adopted: list[Any] = []
    if spec.get("verify_kv"):
        _verify_kv_copies()
    if spec.get("async_scheduling"):
        from vllm.platforms.cpu import CpuPlatform

        original = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

        def keep_async(cls: Any, vllm_config: Any) -> None:
            original(cls, vllm_config)
            vllm_config.scheduler_config.async_scheduling = True

        CpuPlatform.check_and_update_config = classmethod(keep_async)  # type: ignore[method-assign,assignment]
    if spec.get("drop_after_lookup") is not None:
        from kvtier_connectors.vllm import settings

        original_open = settings.open_store

        def open_dropping(connector_settings: Any, layout: Any, role: str = "", engine_id: str = "") -> Any:
            if connector_settings.instance not in settings._stores:
                store = _dropping_store(spec, layout)
                settings.adopt_store(connector_settings.instance, store)
                adopted.append(store)
            return original_open(connector_settings, layout, role, engine_id)

        settings.open_store = open_dropping  # type: ignore[assignment]
        import kvtier_connectors.vllm.connector as connector_module

        connector_module.open_store = open_dropping  # type: ignore[assignment]
    return adopted


def _stats(spec: dict[str, Any], engine_id: str) -> dict[str, Any] | None:
    where = spec.get("stats")
    if not where:
        return None
    if where == "embedded":
        from kvtier_connectors.vllm.settings import _stores

        instance = spec["extra"].get("instance", "default")
        return _stores[instance].store.stats().to_dict()
    from kvtier.config import StoreConfig
    from kvtier.daemon.stats_cmd import fetch
    from kvtier_connectors.vllm.engine_store import engine_socket_path

    path = engine_socket_path(engine_id, spec["extra"].get("instance", "default")) if where == "engine" else where
    stats: dict[str, Any] | None = fetch(f"unix:{path}", StoreConfig())["stats"]
    return stats


def main(spec: dict[str, Any]) -> dict[str, Any]:
    adopted = _install_hooks(spec)
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = {}
    if spec.get("extra") is not None:
        kwargs["kv_transfer_config"] = {
            "kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier_connectors.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": spec["extra"],
        }
    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype="bfloat16", seed=0, enable_prefix_caching=False, enforce_eager=True,
              compilation_config={"mode": 0}, max_model_len=4096,
              max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096),
              tensor_parallel_size=spec.get("tensor_parallel_size", 1), **kwargs)
    result: dict[str, Any] = {"init_s": time.perf_counter() - started, "phases": []}
    if spec.get("switch_interval"):
        # For measurements: the interpreter's switch interval the requests run under (in-process engines).
        sys.setswitchinterval(float(spec["switch_interval"]))
    engine_id = str(llm.llm_engine.vllm_config.instance_id)
    result["engine_id"] = engine_id
    result["async_scheduling"] = bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)
    for phase in spec["phases"]:
        params = SamplingParams(max_tokens=phase.get("max_tokens", 8), temperature=0.0)
        outputs = []
        for prompt in phase["prompts"]:
            begin = time.perf_counter()
            output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
            outputs.append({"tokens": list(output.outputs[0].token_ids), "cached": int(output.num_cached_tokens or 0),
                            "seconds": time.perf_counter() - begin})
        result["phases"].append(outputs)
    result["stats"] = _stats(spec, engine_id)
    result["dropped"] = [key for store in adopted for key in store.dropped]
    result["kv_checks"] = KV_CHECKS
    return result


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print("RESULT " + json.dumps(main(json.load(handle))), flush=True)
