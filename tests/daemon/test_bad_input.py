"""Protocol violations and bad requests on raw sockets: error replies, closed connections, and a daemon
that keeps serving everyone else with its data intact."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import torch

from kvtier.daemon.protocol import VERSION, pack, read_frame

if TYPE_CHECKING:
    from conftest import DaemonProc, Kit


def raw(daemon: DaemonProc, hello: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(daemon.socket_path)
    if hello:
        reply = request(sock, {"v": VERSION, "op": "hello", "id": 1, "layout": None})
        assert reply["status"] == "ok"
    return sock


def request(sock: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(pack(message))
    reply = read_frame(sock, 1 << 20)
    assert reply is not None
    return reply


def assert_closed(sock: socket.socket) -> None:
    assert sock.recv(1) == b""


@pytest.mark.parametrize(("frame", "kind"), [
    (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "ProtocolError"),                     # not msgpack
    (struct.pack(">I", 1 << 30), "ProtocolError"),                                # 1 GiB announced
    (pack({"v": VERSION + 1, "op": "stats", "id": 5}), "ProtocolError"),          # another version
    (pack({"v": VERSION, "op": "stats"}), "ProtocolError"),                        # no id
])
def test_a_protocol_violation_gets_an_error_reply_then_the_connection_closes(
        daemon: DaemonProc, frame: bytes, kind: str) -> None:
    with raw(daemon) as sock:
        sock.sendall(frame)
        reply = read_frame(sock, 1 << 20)
        assert reply is not None and reply["status"] == "error" and reply["kind"] == kind
        assert_closed(sock)


def test_a_request_before_hello_closes_the_connection(daemon: DaemonProc) -> None:
    with raw(daemon, hello=False) as sock:
        reply = request(sock, {"v": VERSION, "op": "lookup", "id": 3, "keys": []})
        assert reply["status"] == "error" and reply["id"] == 3
        assert_closed(sock)


def test_errors_of_one_request_leave_the_connection_open(daemon: DaemonProc, kit: Kit) -> None:
    layout = kit.layout.to_dict()
    with raw(daemon, hello=False) as sock:
        assert request(sock, {"v": VERSION, "op": "hello", "id": 1, "layout": layout})["status"] == "ok"
        for bad, kind in (({"op": "frobnicate"}, "InvalidInputError"),
                          ({"op": "lookup", "keys": [b"short"]}, "InvalidInputError"),
                          ({"op": "lookup", "keys": "not a list"}, "InvalidInputError"),
                          ({"op": "commit", "keys": [kit.key_of(1)]}, "InvalidInputError"),
                          ({"op": "put", "keys": [kit.key_of(1)], "data": [b"x"]}, "InvalidInputError"),
                          ({"op": "acquire", "keys": [], "timeout": "soon"}, "InvalidInputError"),
                          ({"op": "flush", "timeout_s": 0}, "InvalidInputError"),
                          ({"op": "flush", "timeout_s": 1e9}, "InvalidInputError"),
                          ({"op": "flush", "timeout_s": "later"}, "InvalidInputError")):
            reply = request(sock, {"v": VERSION, "id": 9, **bad})
            assert (reply["status"], reply["kind"], reply["id"]) == ("error", kind, 9), reply
        assert request(sock, {"v": VERSION, "op": "lookup", "id": 10, "keys": []})["num_blocks"] == 0


def test_other_clients_are_served_while_one_misbehaves(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "bystander") for i in range(4)]
    with daemon.client() as client:
        assert client.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
        for _ in range(5):
            with raw(daemon, hello=False) as sock:
                sock.sendall(struct.pack(">I", 100) + b"partial")  # then hang up mid-frame
        with raw(daemon, hello=False) as sock:
            sock.sendall(msgpack.packb({"not": "framed"}))
        out = [torch.empty(kit.layout.block_shape) for _ in keys]
        assert client.get(keys, out).wait(10).ok
        assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, keys, strict=True))


def test_before_hello_only_small_frames_are_read(daemon: DaemonProc) -> None:
    with socket.create_connection(("127.0.0.1", daemon.tcp_port), timeout=10) as sock:
        sock.sendall(struct.pack(">I", 1 << 20))  # 1 MiB, far below max_frame_bytes, but no token yet
        reply = read_frame(sock, 1 << 20)
        assert reply is not None and reply["kind"] == "ProtocolError" and "exceeds" in reply["message"]
        assert_closed(sock)


def _held(daemon: DaemonProc) -> tuple[int, int]:
    """(reserved blocks, connections held after an error reply) in the daemon now."""
    stats = daemon.stats()["daemon"]
    return stats["reserved_blocks"], stats["held_after_error"]


def _wait_for(daemon: DaemonProc, expected: tuple[int, int], timeout_s: float = 10) -> float:
    """Seconds until ``_held`` says ``expected`` (the test fails if it never does)."""
    started = time.monotonic()
    while _held(daemon) != expected:
        assert time.monotonic() - started < timeout_s, _held(daemon)
        time.sleep(0.02)
    return time.monotonic() - started


def _reserve_then_violate(sock: socket.socket, layout: dict[str, Any], key: bytes, token: str = "") -> None:
    """Hello with a layout, reserve ``key``, then a frame that is not msgpack: its error reply ends the
    connection on the daemon's side."""
    assert request(sock, {"v": VERSION, "op": "hello", "id": 1, "layout": layout, "token": token})["status"] == "ok"
    assert request(sock, {"v": VERSION, "op": "reserve", "id": 2, "keys": [key]})["slots"]
    sock.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    reply = read_frame(sock, 1 << 20)
    assert reply is not None and reply["kind"] == "ProtocolError"


def test_the_slots_of_a_connection_the_daemon_ended_stay_held_until_hold_after_error_s(
        make_daemon: Callable[..., DaemonProc], kit: Kit) -> None:
    """The daemon ends the connection (its write side shut: the client reads the end of the stream) but keeps
    its reservation, which a late copy of the client may still write, until the client closes it or
    ``daemon.hold_after_error_s`` passes; bytes sent meanwhile are dropped unread."""
    daemon = make_daemon(settings=["daemon.hold_after_error_s=1"])
    with raw(daemon, hello=False) as sock:
        _reserve_then_violate(sock, kit.layout.to_dict(), kit.key_of(0, "held"))
        assert_closed(sock)
        assert _held(daemon) == (1, 1)
        sock.sendall(pack({"v": VERSION, "op": "abort", "id": 3, "keys": [kit.key_of(0, "held")]}))
        assert _wait_for(daemon, (0, 0)) > 0.5
    assert "freeing 1 reserved and 0 leased slots" in daemon.log()


def test_a_closed_peer_or_a_stop_frees_the_held_slots_at_once(make_daemon: Callable[..., DaemonProc],
                                                                kit: Kit) -> None:
    daemon = make_daemon()
    with raw(daemon, hello=False) as sock:
        _reserve_then_violate(sock, kit.layout.to_dict(), kit.key_of(0, "closed"))
        assert _held(daemon) == (1, 1)
    _wait_for(daemon, (0, 0))
    with raw(daemon, hello=False) as sock:
        _reserve_then_violate(sock, kit.layout.to_dict(), kit.key_of(1, "closed"))
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 10


def test_a_tcp_connection_the_daemon_ended_frees_its_slots_at_once(daemon: DaemonProc, kit: Kit) -> None:
    """A TCP client never maps the arena, so no late copy can touch its slots: nothing to hold."""
    with socket.create_connection(("127.0.0.1", daemon.tcp_port), timeout=10) as sock:
        _reserve_then_violate(sock, kit.layout.to_dict(), kit.key_of(0, "tcp-held"), token=daemon.token)
        _wait_for(daemon, (0, 0))


def _rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def test_a_header_alone_commits_no_memory_for_the_body_it_announces(daemon: DaemonProc) -> None:
    """Four connections announce 200 MiB bodies and send 1 KiB of each: the daemon's memory grows by what
    arrived, not by 800 MiB (a zeroed buffer of the announced size would commit all of it)."""
    before = _rss_bytes(daemon.proc.pid)
    socks = [raw(daemon) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(struct.pack(">I", 200 << 20) + bytes(1024))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert _rss_bytes(daemon.proc.pid) - before < 64 << 20
            time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()
