"""The wire format without a daemon: framing, limits, version checks, stats encoding, addresses."""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

import msgpack
import pytest

from kvtier import ConfigError, HostConfig, ProtocolError, Store, StoreConfig, TransferConfig
from kvtier.daemon.client import parse_address
from kvtier.daemon.protocol import VERSION, pack, read_frame, stats_from_dict, stats_to_dict

if TYPE_CHECKING:
    from conftest import Kit


def test_a_frame_round_trips() -> None:
    left, right = socket.socketpair()
    with left, right:
        message = {"v": VERSION, "op": "lookup", "id": 7, "keys": [b"k" * 16]}
        left.sendall(pack(message) + pack({**message, "id": 8}))
        assert read_frame(right, 1024) == message
        assert read_frame(right, 1024) == {**message, "id": 8}
        left.close()
        assert read_frame(right, 1024) is None  # a clean end between frames


def test_an_oversized_frame_is_refused_before_its_body_is_read() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", 1 << 30))  # announces 1 GiB and sends none of it
        with pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
            read_frame(right, 1 << 20)


@pytest.mark.parametrize(("body", "match"), [
    (b"\xc1", "not valid msgpack"),                                # a never-used msgpack byte
    (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
    (msgpack.packb({"v": 99, "op": "stats", "id": 1}), "version 99"),
    (msgpack.packb({"v": VERSION, "op": "stats"}), "integer 'id'"),
    (msgpack.packb({"v": VERSION, "op": 5, "id": 1}), "'op' must be a string"),
])
def test_malformed_bodies_are_protocol_errors(body: bytes, match: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(ProtocolError, match=match):
            read_frame(right, 1024)


def test_a_stream_cut_inside_a_frame_is_a_protocol_error() -> None:
    left, right = socket.socketpair()
    with right:
        left.sendall(struct.pack(">I", 100) + b"abc")
        left.close()
        with pytest.raises(ProtocolError, match="ended inside a frame"):
            read_frame(right, 1024)


def test_store_stats_survive_the_wire(kit: Kit) -> None:
    config = StoreConfig(host=HostConfig(capacity_bytes=8 * 4096), transfer=TransferConfig(backend="cpu"))
    with Store(kit.layout, config) as store:
        stats = store.stats()
    data = msgpack.unpackb(msgpack.packb(stats_to_dict(stats)))
    assert stats_from_dict(data) == stats


def test_addresses() -> None:
    config = StoreConfig()
    assert parse_address("unix:/tmp/x.sock", config) == ("unix", "/tmp/x.sock")
    assert parse_address("tcp://10.0.0.1:7000", config) == ("tcp", ("10.0.0.1", 7000))
    assert parse_address("tcp://[::1]:7000", config) == ("tcp", ("::1", 7000))
    assert parse_address("unix", config)[1].endswith("kvtier.sock")
    with pytest.raises(ConfigError):
        parse_address("http://x", config)
