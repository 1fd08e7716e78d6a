"""The plots of a ``kvtier bench all`` directory, as PNGs beside its JSON (matplotlib, the ``plots`` extra).

Each plot is keyed on field names and drawn only from the records that carry them, so a benchmark that
changes or lacks a field loses a line or a plot, never the run:

- ``tier_throughput.png``: host put/get and memcpy GB/s by block size; disk write/read and raw O_DIRECT GB/s
  by block size; remote put/get against the raw client by mode.
- ``ttft.png``: time to first token against prompt length: recompute, restore from host, restore from disk.
- ``replay_hit_ratio.png`` and ``replay_disk_writes.png``: hit ratio and disk writes against total capacity
  (share of the trace's unique blocks), for kvtier and the baselines.
- ``alternatives.png``: TTFT, hit ratio and bytes on disk of each alternative.
- ``peers.png``: median TTFT, hit ratio, host memory over no offload and disk writes of each configuration
  of ``bench peers`` that ran (``draw_peers`` also draws it from a recorded ``peers.json``).
- ``scaling_index.png``, ``scaling_prompt.png``, ``daemon_clients.png``: per-block costs against the blocks
  stored and the prompt length; daemon lookup latency against the number of clients.

Promises: ``draw_all(dir)`` returns the file names it wrote; without matplotlib it writes nothing and
returns ``[]``. Figures are closed after saving (no state leaks between runs).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtier.bench.results import Results, load_results, number, series

log = logging.getLogger(__name__)
_MiB = 2**20


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _points(records: list[dict[str, Any]], x: str, y: str,
            where: Callable[[dict[str, Any]], bool] = lambda record: True) -> tuple[list[float], list[float]]:
    """(x, y) of the records that carry both numbers, sorted by x."""
    pairs = sorted((px, py) for record in records if where(record)
                   for px, py in [(number(record, x), number(record, y))] if px is not None and py is not None)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save(figure: Any, out_dir: Path, name: str, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(out_dir / name, dpi=110)
    plt.close(figure)
    written.append(name)


Line = tuple[str, list[float], list[float], bool]  # label, x, y, dashed (a raw baseline)


def _host_lines(results: Results) -> list[Line]:
    lines: list[Line] = []
    for record in results.records("host"):
        sizes = series(record, "block_bytes")
        for name, label in (("host_put_gbps", "kvtier put"), ("host_get_gbps", "kvtier get"),
                            ("memcpy_gbps", "raw memcpy")):
            values = series(record, name)
            if sizes and values and len(values) == len(sizes):
                lines.append((label, [s / _MiB for s in sizes], values, name == "memcpy_gbps"))
        if lines:
            break
    return lines


def _disk_lines(results: Results) -> list[Line]:
    lines: list[Line] = []
    for name, label in (("disk_write_gbps", "kvtier write"), ("raw_write_gbps", "raw O_DIRECT write"),
                        ("disk_read_gbps", "kvtier read"), ("raw_read_gbps", "raw O_DIRECT read")):
        xs, ys = _points(results.records("disk"), "block_bytes", name)
        if xs:
            lines.append((label, [x / _MiB for x in xs], ys, name.startswith("raw")))
    return lines


def _tier_throughput(results: Results, out_dir: Path, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    panels = [(title, lines) for title, lines in (("host tier", _host_lines(results)),
                                                  ("disk tier", _disk_lines(results))) if lines]
    remote = [r for r in results.records("remote") if number(r, "remote_put_gbps") is not None]
    count = len(panels) + bool(remote)
    if not count:
        return
    figure, axes = plt.subplots(1, count, figsize=(5.5 * count, 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=False):
        for label, xs, ys, dashed in lines:
            ax.plot(xs, ys, marker="o", label=label, linestyle="--" if dashed else "-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size (MiB)")
        ax.set_title(title)
    if remote:
        ax = axes[0][-1]
        width = 0.2
        for offset, (name, label) in enumerate((("remote_put_gbps", "kvtier put"), ("raw_put_gbps", "raw put"),
                                                ("remote_get_gbps", "kvtier get"), ("raw_get_gbps", "raw get"))):
            ax.bar([i + (offset - 1.5) * width for i in range(len(remote))],
                   [number(r, name) or 0.0 for r in remote], width, label=label)
        ax.set_xticks(range(len(remote)), [str(r.get("mode", i)) for i, r in enumerate(remote)])
        ax.set_title("remote tier")
    for ax in axes[0]:
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(figure, out_dir, "tier_throughput.png", written)


def _ttft_lines(records: list[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Prompt tokens -> seconds for recompute, host and disk restores, in either record shape.

    One record per prompt with ``restore_host_s``/``restore_disk_s``, or one per (prompt, source) with
    ``source`` and ``ttft_kvtier_s``.
    """
    lines = {"recompute": _points(records, "prompt_tokens", "recompute_s"),
             "restore from host": _points(records, "prompt_tokens", "restore_host_s"),
             "restore from disk": _points(records, "prompt_tokens", "restore_disk_s")}
    for source in ("host", "disk"):
        def from_source(record: dict[str, Any], source: str = source) -> bool:
            return record.get("source") == source

        xs, ys = _points(records, "prompt_tokens", "ttft_kvtier_s", from_source)
        old_xs, old_ys = lines[f"restore from {source}"]
        merged = sorted(zip(old_xs + xs, old_ys + ys, strict=True))
        lines[f"restore from {source}"] = ([p[0] for p in merged], [p[1] for p in merged])
    xs, ys = lines["recompute"]
    deduplicated = dict(zip(xs, ys, strict=True))  # one recompute per prompt length when records repeat it
    lines["recompute"] = (list(deduplicated), list(deduplicated.values()))
    return {name: line for name, line in lines.items() if line[0]}


def _ttft(results: Results, out_dir: Path, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    lines = _ttft_lines(results.records("ttft"))
    if not lines:
        return
    figure, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("TTFT: recompute vs restore")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(figure, out_dir, "ttft.png", written)


def capacity_percent(record: dict[str, Any]) -> float | None:
    """A replay record's total capacity (host + disk blocks) as a share of the trace's unique blocks, in %."""
    host, disk, unique = (number(record, name) for name in ("host_blocks", "disk_blocks", "unique_blocks"))
    if host is None or disk is None or not unique:
        return None
    return 100.0 * (host + disk) / unique


def _replay(results: Results, out_dir: Path, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    records = [dict(r, capacity_percent=capacity_percent(r)) for r in results.records("replay")]
    lines = {"kvtier": _points(records, "capacity_percent", "block_hit_ratio")}
    for name in ("lru", "s3fifo", "arc", "belady"):
        lines[name.upper() if name != "s3fifo" else "S3-FIFO"] = _points(records, "capacity_percent",
                                                                         f"baselines.{name}")
    lines = {name: line for name, line in lines.items() if line[0]}
    if lines:
        figure, ax = plt.subplots(figsize=(6, 4))
        for name, (xs, ys) in lines.items():
            ax.plot(xs, [100 * y for y in ys], marker="o", label=name, linewidth=2.5 if name == "kvtier" else 1.2)
        ax.set_xlabel("capacity (% of the trace's unique blocks)")
        ax.set_ylabel("block hit ratio (%)")
        ax.set_title("trace replay: hit ratio vs capacity")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(figure, out_dir, "replay_hit_ratio.png", written)
    writes = {"kvtier": _points(records, "capacity_percent", "disk_blocks_written"),
              "admit-all": _points(records, "capacity_percent", "baseline_disk_blocks_written")}
    writes = {name: line for name, line in writes.items() if line[0]}
    if writes:
        figure, ax = plt.subplots(figsize=(6, 4))
        for name, (xs, ys) in writes.items():
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel("capacity (% of the trace's unique blocks)")
        ax.set_ylabel("blocks written to disk")
        ax.set_title("trace replay: disk writes vs capacity")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(figure, out_dir, "replay_disk_writes.png", written)


def _alternatives(results: Results, out_dir: Path, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    records = [r for r in results.records("alternatives") if "alternative" in r]
    if not records:
        return
    names = [str(r["alternative"]) for r in records]
    panels = (("ttft_total_s", "TTFT, all requests (s)", 1.0), ("hit_ratio", "prompt tokens restored (%)", 100.0),
              ("disk_bytes", "data on disk (MiB)", 1 / _MiB))
    figure, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (name, label, scale) in zip(axes, panels, strict=True):
        ax.bar(range(len(records)), [(number(r, name) or 0.0) * scale for r in records])
        ax.set_xticks(range(len(records)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    _save(figure, out_dir, "alternatives.png", written)


def draw_peers(records: list[dict[str, Any]], out_dir: Path, written: list[str]) -> None:
    """``peers.png`` from ``bench peers`` records; the configurations that did not run are left out of it."""
    import matplotlib.pyplot as plt

    ran = [r for r in records if "peer" in r and r.get("status") == "ok"]
    if not ran:
        return
    names = [str(r["peer"]) for r in ran]
    panels = (("ttft_median_ms", "TTFT, median (ms)", 1.0), ("hit_ratio", "prompt tokens restored (%)", 100.0),
              ("host_memory_over_none_bytes", "host memory over no offload (MiB)", 1 / _MiB),
              ("disk_write_bytes", "bytes written to storage (MiB)", 1 / _MiB))
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    for ax, (name, label, scale) in zip(axes, panels, strict=True):
        ax.bar(range(len(ran)), [(number(r, name) or 0.0) * scale for r in ran])
        ax.set_xticks(range(len(ran)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    _save(figure, out_dir, "peers.png", written)


def _peers(results: Results, out_dir: Path, written: list[str]) -> None:
    draw_peers(results.records("peers"), out_dir, written)


def _scaling(results: Results, out_dir: Path, written: list[str]) -> None:
    import matplotlib.pyplot as plt

    for record in results.records("scaling"):
        for sweep_name, x_name, x_label, name in (("index", "blocks", "blocks stored", "scaling_index.png"),
                                                  ("prompt", "tokens", "prompt tokens", "scaling_prompt.png")):
            sweep = record.get(sweep_name)
            if not isinstance(sweep, dict):
                continue
            xs = series(sweep, x_name)
            lines = {key.removesuffix("_us_per_block"): series(sweep, key) for key in sweep
                     if key.endswith("_us_per_block") and not key.startswith("fill")}
            drawn = {k: v for k, v in lines.items() if v and xs and len(v) == len(xs)}
            if not xs or not drawn:
                continue
            figure, ax = plt.subplots(figsize=(6, 4))
            for label, ys in drawn.items():
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel("microseconds per block")
            ax.set_title(f"cost per block vs {x_label} (flat = O(1) per block)")
            ax.legend()
            ax.grid(alpha=0.3, which="both")
            _save(figure, out_dir, name, written)
        break
    for record in results.records("daemon"):
        clients = series(record, "clients")
        lines = {label: series(record, key) for key, label in (("lookup_p50_us", "p50, closed loop"),
                                                              ("lookup_p99_us", "p99, closed loop"),
                                                              ("paced_lookup_p99_us", "p99, 1 lookup/ms/client"))}
        drawn = {k: v for k, v in lines.items() if v and clients and len(v) == len(clients)}
        if not clients or not drawn:
            continue
        figure, ax = plt.subplots(figsize=(6, 4))
        for label, ys in drawn.items():
            ax.plot(clients, ys, marker="o", label=label)
        ax.axhline(1000, color="grey", linestyle=":", label="target p99 (4 clients)")
        ax.set_xlabel("client processes")
        ax.set_ylabel("64-key lookup latency (us)")
        ax.set_title("daemon lookup latency vs clients")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(figure, out_dir, "daemon_clients.png", written)
        break


def draw_all(out_dir: str | Path) -> list[str]:
    """Draw every plot whose records are in ``out_dir``; the PNG names written (see the module docstring)."""
    if not matplotlib_available():
        log.warning("matplotlib is not installed (pip install 'kvtier[plots]'): no plots drawn")
        return []
    import matplotlib

    matplotlib.use("Agg")
    root = Path(out_dir)
    results = load_results(root)
    written: list[str] = []
    for draw in (_tier_throughput, _ttft, _replay, _alternatives, _peers, _scaling):
        try:
            draw(results, root, written)
        except Exception:  # one broken plot must not cost the others; the log says which
            log.exception("plot %s failed", draw.__name__)
    return written
