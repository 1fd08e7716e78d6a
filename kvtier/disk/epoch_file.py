"""The disk tier's key epochs in a file of their own, beside the index that also records them.

Epochs (``kvtier.epochs``) make the keys of an older epoch unreachable; the blocks stay on disk. An index
judged damaged is rebuilt from the entry headers of the data files, which know nothing of epochs: without
another record of them, every scope would be back at epoch 0 and the blocks of the old epoch 0 (the KV of
weights since replaced) would be served again to keys derived under it. This file is that record.

Promises:
- ``write_epoch_file(path, epochs)`` replaces the file atomically and durably (a temporary file written and
  fsynced, renamed over it, the directory fsynced): a crash leaves the old file or the new one, never a mix.
- ``read_epoch_file(path)`` returns the epochs by scope, or ``None`` where the file is missing or is not
  one this module wrote (unreadable, not JSON, another version, a scope or epoch of the wrong type): the
  caller cannot know the epochs then.
"""

from __future__ import annotations

import json
import os

EPOCH_FILE = "kvtier-epochs.json"
_VERSION = 1


def read_epoch_file(path: str) -> dict[str, int] | None:
    """The epochs recorded at ``path``, or ``None`` if there is no valid record there."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("version") != _VERSION:
        return None
    epochs = document.get("epochs")
    if not isinstance(epochs, dict) or not all(
            isinstance(scope, str) and type(epoch) is int and epoch >= 0 for scope, epoch in epochs.items()):
        return None
    return dict(epochs)


def write_epoch_file(path: str, epochs: dict[str, int]) -> None:
    """Record ``epochs`` at ``path``, replacing what was there; durable when this returns (``OSError`` if not)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump({"version": _VERSION, "epochs": epochs}, file, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
