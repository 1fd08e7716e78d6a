"""Progress of long benchmarks: a ``rich`` bar on a terminal, one plain line per step otherwise.

Promises:
- ``track(items, description)`` yields ``items`` in order and reports progress on stderr, never stdout (a
  benchmark's stdout is its JSON record).
- On a terminal the bar shows the step count and the elapsed time; elsewhere (a pipe: ``kvtier bench all``
  runs each benchmark as a subprocess and shows the child's last stderr line in its own bar) one line
  ``<description>: <i>/<n>`` per step, flushed at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_bar(console: Console | None = None, *, transient: bool = False) -> Progress:
    """The bar every kvtier benchmark uses: description, bar, ``i/n``, elapsed time; on stderr."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console or Console(stderr=True), transient=transient)


def track(items: Sequence[T], description: str) -> Iterator[T]:
    """Yield ``items``, reporting ``description`` and the step count on stderr (see the module docstring)."""
    if sys.stderr.isatty():
        with progress_bar(transient=True) as bar:
            task = bar.add_task(description, total=len(items))
            for item in items:
                yield item
                bar.advance(task)
        return
    for index, item in enumerate(items):
        print(f"{description}: {index + 1}/{len(items)}", file=sys.stderr, flush=True)
        yield item
