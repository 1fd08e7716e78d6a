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
        advanced = second.advance_epoch("epochs/shared")
        assert advanced > base and first.epoch("epochs/shared") == advanced
        keys = [kit.key_of(i, "epochs") for i in range(3)]
        assert first.lookup(keys, scope="epochs/shared").epoch == advanced  # no extra round trip to learn it
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
        client.advance_epoch("epochs/disk")
        last = client.advance_epoch("epochs/disk")
    assert first.stop() == 0
    second = make_daemon(*args)
    with second.client() as client:
        assert client.epoch("epochs/disk") == last
        assert client.advance_epoch("epochs/disk") > last


def test_a_daemon_restarted_without_its_epochs_never_hands_one_out_again(
        make_daemon: Callable[..., DaemonProc]) -> None:
    """Without a disk tier a restarted daemon forgets its epochs, but a client that has not noticed the restart
    still derives keys under the old one and writes them into the successor (a vLLM engine learns the epoch
    from a new request's lookup, and saves a decoding request's chunks meanwhile). Were the successor's next
    advance that same number, those blocks, saved before that reset, would be found after it."""
    first = make_daemon()
    with first.client() as client:
        before = client.advance_epoch("epochs/forgotten")
    assert first.stop() == 0
    second = make_daemon()
    with second.client() as client:
        assert client.epoch("epochs/forgotten") == 0  # forgotten, with the blocks of the host tier
        after = client.advance_epoch("epochs/forgotten")
        assert after > before, f"the restarted daemon handed out epoch {after} again"
