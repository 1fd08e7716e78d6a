"""Reading a ``kvtier bench all`` output directory back: the run's description and every step's records.

Promises: ``load_results(dir)`` never fails on a step file it cannot parse (the step is reported as failed
with the reason); steps come in the order ``run.json`` lists them, then any other step file by name.
``numbers(records, field)`` and friends return only values that are real numbers, so that a plot or a
target built on a field a benchmark no longer prints (or does not print yet) is skipped, not an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.errors import InvalidInputError

_NOT_STEPS = {"run.json", "gpu-check.json"}


@dataclass(frozen=True)
class Results:
    directory: Path
    run: dict[str, Any]
    steps: list[dict[str, Any]]
    gpu_check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def records(self, benchmark: str) -> list[dict[str, Any]]:
        """Every record of ``benchmark``'s steps, in step order (failed steps' records too).

        A record that wraps its own ``records`` list (``{"benchmark", "device", "records": [...]}``) stands
        for those records, each with the wrapper's other fields as defaults.
        """
        return [flat for step in self.steps if step.get("benchmark") == benchmark
                for record in step.get("records", []) if isinstance(record, dict) for flat in _flatten(record)]

    def steps_of(self, benchmark: str) -> list[dict[str, Any]]:
        return [step for step in self.steps if step.get("benchmark") == benchmark]


def _flatten(record: dict[str, Any]) -> list[dict[str, Any]]:
    inner = record.get("records")
    if not isinstance(inner, list):
        return [record]
    outer = {name: value for name, value in record.items() if name != "records"}
    return [{**outer, **item} for item in inner if isinstance(item, dict)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return exc


def load_results(directory: str | Path) -> Results:
    """The run and its steps in ``directory`` (see the module docstring); ``InvalidInputError`` if none."""
    root = Path(directory)
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a directory (give the --out directory of `kvtier bench all`)")
    run = _read_json(root / "run.json") if (root / "run.json").exists() else {}
    notes: list[str] = []
    if not isinstance(run, dict):
        notes.append(f"run.json could not be read: {run}")
        run = {}
    listed = [step["step"] for step in run.get("steps", []) if isinstance(step, dict) and "step" in step]
    others = sorted(path.stem for path in root.glob("*.json") if path.name not in _NOT_STEPS)
    steps: list[dict[str, Any]] = []
    for name in dict.fromkeys([*listed, *others]):
        loaded = _read_json(root / f"{name}.json")
        if isinstance(loaded, dict) and isinstance(loaded.get("records", []), list):
            steps.append({"step": name, **loaded})
        else:
            reason = loaded if isinstance(loaded, Exception) else "not a step record"
            steps.append({"step": name, "benchmark": name, "status": "failed", "records": [],
                          "error": f"{name}.json could not be read: {reason}"})
    if not steps and not run:
        raise InvalidInputError(f"{root} holds no `kvtier bench all` output (no run.json, no step files)")
    gpu = _read_json(root / "gpu-check.json") if (root / "gpu-check.json").exists() else None
    if isinstance(gpu, Exception):
        notes.append(f"gpu-check.json could not be read: {gpu}")
        gpu = None
    return Results(root, run, steps, gpu if isinstance(gpu, dict) else None, notes)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(record: dict[str, Any], name: str) -> float | None:
    """``record[name]`` when it is a finite number, else ``None``; ``a.b`` reads a nested dict."""
    value: Any = record
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if is_number(value) else None


def series(record: dict[str, Any], name: str) -> list[float] | None:
    """``record[name]`` when it is a list of finite numbers, else ``None``; ``a.b`` reads a nested dict."""
    value: Any = record
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, list) and value and all(is_number(item) for item in value):
        return [float(item) for item in value]
    return None
