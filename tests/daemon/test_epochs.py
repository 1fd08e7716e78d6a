"""Key epochs through the daemon: one counter per scope shared by every client, riding on lookups, persisted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kvtier.errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import DaemonProc, Kit


def test_every_client_of_a_daemon_sees_one_epoch_per_scope(daemon: DaemonProc, kit: Kit) -> None:
    with daemon.client() as first, daemon.client() as second:
        base = first.epoch("epochs/shared")
        assert second.advance_epoch("epochs/shared") == base + 1
        assert first.epoch("epochs/shared") == base + 1
        keys = [kit.key_of(i, "epochs") for i in range(3)]
        assert first.lookup(keys, scope="epochs/shared").epoch == base + 1  # no extra round trip to learn it
        assert first.lookup(keys).epoch is None
        assert first.epoch("epochs/other") == 0


def test_a_client_restart_keeps_the_epoch_and_a_bad_scope_is_an_error_reply(daemon: DaemonProc) -> None:
    with daemon.client() as client:
        epoch = client.advance_epoch("epochs/restart")
    with daemon.client() as client:
        assert client.epoch("epochs/restart") == epoch
        for bad in ("", "x" * 300):
            with pytest.raises(InvalidInputError, match="scope"):
                client.advance_epoch(bad)
            with pytest.raises(InvalidInputError, match="scope"):  # checked by the daemon too
                client._call("advance_epoch", scope=bad)
        with pytest.raises(InvalidInputError, match="scope"):
            client._call("epoch", scope=5)
        assert client.epoch("epochs/restart") == epoch


def test_a_daemon_with_a_disk_tier_keeps_epochs_across_its_restart(make_daemon: Callable[..., DaemonProc],
                                                                   tmp_path: Path) -> None:
    args: tuple[Any, ...] = ("--disk", str(tmp_path))
    first = make_daemon(*args)
    with first.client() as client:
        assert client.advance_epoch("epochs/disk") == 1
        assert client.advance_epoch("epochs/disk") == 2
    assert first.stop() == 0
    second = make_daemon(*args)
    with second.client() as client:
        assert client.epoch("epochs/disk") == 2
        assert client.advance_epoch("epochs/disk") == 3
