"""Random and mutated frames thrown at a daemon; afterwards it still answers and its data is intact."""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import msgpack
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.daemon.protocol import VERSION, pack

if TYPE_CHECKING:
    from conftest import DaemonProc, Kit

OPS = ["hello", "lookup", "contains", "reserve", "commit", "abort", "acquire", "release", "put", "get", "stats",
       "flush", "nope"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
# A few well-formed keys recur, so that reserve, commit, acquire and release of the same keys meet.
POOL_KEYS = [bytes([i]) * 16 for i in range(8)]
keys = st.lists(st.sampled_from(POOL_KEYS) | st.binary(max_size=20), max_size=6)
layouts = values | st.dictionaries(
    st.sampled_from(["num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens", "kind", "extra"]),
    st.integers(-1, 8) | st.sampled_from(["float32", "kv", "latent", "bogus"]) | values, max_size=7)
requests = st.fixed_dictionaries(
    {"v": st.just(VERSION) | st.integers(0, 3), "op": st.sampled_from(OPS), "id": st.integers(0, 2**31)},
    optional={"keys": keys, "prefetch": values, "prefix": values, "timeout": values, "data": values,
              "layout": layouts, "namespace": values, "token": values},
)


def _send_all(daemon: DaemonProc, hello: dict[str, Any], frames: list[bytes]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(daemon.socket_path)
        sock.sendall(pack(hello))
        for frame in frames:
            try:
                sock.sendall(frame)
            except OSError:
                return  # the daemon closed the connection on a violation, as it should
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            return


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["request", "mutated", "bytes", "lying_length"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    body = msgpack.packb(draw(requests), use_bin_type=True)
    if kind == "mutated" and body:
        data = bytearray(body)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        body = bytes(data)
    length = len(body) if kind != "lying_length" else draw(st.integers(0, 2**32 - 1))
    return struct.pack(">I", length) + body


def test_random_frames_leave_the_daemon_serving_and_its_data_intact(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "fuzz-canary") for i in range(8)]
    canary = daemon.client()
    assert canary.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
    # A lease pins the canary, so that reservations made by fuzzed frames cannot evict it.
    lease = canary.acquire(keys)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(frames(), min_size=1, max_size=6), st.booleans())
    def throw(batch: list[bytes], with_layout: bool) -> None:
        hello = {"v": VERSION, "op": "hello", "id": 0, "layout": kit.layout.to_dict() if with_layout else None}
        _send_all(daemon, hello, batch)

    throw()
    for key, slot in zip(lease.keys, lease.slots, strict=True):
        assert torch.equal(canary.slot_view(slot), kit.block_for(key).reshape(-1))
    canary.release(lease)
    canary.close()
    with daemon.client() as client:
        out = [torch.empty(kit.layout.block_shape) for _ in keys]
        assert client.get(keys, out).wait(10).ok
        assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, keys, strict=True))
    # A session the daemon ended is freed once its peer closed: the last one's thread may still be at it.
    deadline = time.monotonic() + 10
    while (stats := daemon.stats())["daemon"]["reserved_blocks"] or stats["daemon"]["leased_blocks"]:
        assert time.monotonic() < deadline, stats["daemon"]
        time.sleep(0.02)
    assert stats["stats"]["tiers"]["host"]["detail"]["writing_blocks"] == 0
    assert stats["stats"]["tiers"]["host"]["detail"]["pinned_blocks"] == 0
    assert "Traceback" not in daemon.log()
