"""The kvtier daemon (``kvtier serve``) and its client.

- ``Client``: the embedded ``Store``'s interface, served by a daemon over a Unix socket (zero copy through
  the shared arena) or TCP (payloads in frames).
- ``open_store(layout, config)``: an embedded ``Store``, or a ``Client`` when ``config.daemon.connect`` names
  a daemon, so that adapters switch between them by configuration alone.
- ``Daemon`` (``kvtier.daemon.server``), the wire protocol (``kvtier.daemon.protocol``), the commands
  (``serve_cmd``, ``stats_cmd``); see docs/daemon.md.
"""

from __future__ import annotations

from kvtier.config import StoreConfig
from kvtier.daemon.client import Client
from kvtier.layout import KVLayout
from kvtier.store import Store


def open_store(layout: KVLayout, config: StoreConfig | None = None, **client_options: str) -> Store | Client:
    """``Client(layout, config)`` if ``config.daemon.connect`` is set, else an embedded ``Store``."""
    config = config or StoreConfig()
    if config.daemon.connect:
        return Client(layout, config, **client_options)  # type: ignore[arg-type]
    return Store(layout, config)


__all__ = ["Client", "open_store"]
