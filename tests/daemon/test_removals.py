"""The store's removal log through the daemon: one log for every client, numbered as the embedded store's."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kvtier.errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import DaemonProc, Kit


def test_every_client_reads_the_keys_the_daemon_evicted(make_daemon: Callable[..., DaemonProc], kit: Kit) -> None:
    daemon = make_daemon(pool="16KiB")  # 4 slots of one 4 KiB block, no disk tier
    with daemon.client() as writer, daemon.client() as reader:
        start = reader.removed_since(0)
        assert (start.next_seq, start.keys, start.overflowed) == (0, (), False)
        keys = [kit.key_of(i, "removals") for i in range(6)]
        for key in keys:
            assert writer.put([key], [kit.block_for(key)]).wait(30).ok
        removed = reader.removed_since(0)
        assert removed.keys == tuple(keys[:2]) and not removed.overflowed
        assert removed.log_id == writer.removed_since(removed.next_seq).log_id
        assert writer.removed_since(removed.next_seq).keys == ()
        with pytest.raises(InvalidInputError, match="seq"):
            reader.removed_since(-1)
        with pytest.raises(InvalidInputError, match="seq"):  # checked by the daemon too
            reader._call("removed_since", seq="0")
