from __future__ import annotations

import pytest
import torch

from kvtier import ConfigError, InvalidInputError, KVLayout


def test_block_bytes_and_shape() -> None:
    layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=64, dtype="bfloat16", block_tokens=16)
    assert layout.block_shape == (16, 2, 8, 16, 64)
    assert layout.block_bytes == 16 * 2 * 8 * 16 * 64 * 2
    assert layout.token_bytes * 16 == layout.block_bytes


def test_latent_layout_has_one_plane() -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=1, head_dim=576, dtype="bfloat16", block_tokens=64, kind="latent")
    assert layout.block_shape == (4, 1, 1, 64, 576)


def test_fingerprint_is_stable_and_sensitive() -> None:
    base = KVLayout(2, 2, 8, "float32", 4)
    assert base.fingerprint == KVLayout(2, 2, 8, "float32", 4).fingerprint
    # Pinned: a change here silently turns every stored block into a miss; bump deliberately.
    assert base.fingerprint == "273317b9e555bcb1"
    others = [KVLayout(3, 2, 8, "float32", 4), KVLayout(2, 2, 8, "float16", 4), KVLayout(2, 2, 8, "float32", 8),
              KVLayout(2, 2, 8, "float32", 4, kind="latent")]
    assert len({base.fingerprint, *(o.fingerprint for o in others)}) == 5


def test_round_trip_through_dict() -> None:
    layout = KVLayout(2, 2, 8, "float16", 4)
    assert KVLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ConfigError):
        KVLayout.from_dict({"num_layers": 2, "colour": "red"})


@pytest.mark.parametrize("fields", [
    {"num_layers": 0}, {"num_kv_heads": -1}, {"head_dim": 1.5}, {"dtype": "float64"}, {"kind": "kvv"},
    {"block_tokens": True},
])
def test_bad_fields_are_refused(fields: dict[str, object]) -> None:
    values: dict[str, object] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float32",
                                 "block_tokens": 4, **fields}
    with pytest.raises(ConfigError):
        KVLayout(**values)  # type: ignore[arg-type]


def test_check_block(layout: KVLayout) -> None:
    layout.check_block(torch.zeros(layout.block_shape))
    layout.check_block(torch.zeros(layout.block_numel))
    with pytest.raises(InvalidInputError, match="dtype"):
        layout.check_block(torch.zeros(layout.block_shape, dtype=torch.float16))
    with pytest.raises(InvalidInputError, match="shape"):
        layout.check_block(torch.zeros(layout.block_numel + 1))
    with pytest.raises(InvalidInputError, match="contiguous"):
        layout.check_block(torch.zeros(layout.block_shape[::-1]).permute(4, 3, 2, 1, 0))
    with pytest.raises(InvalidInputError, match="Tensor"):
        layout.check_block(b"bytes")  # type: ignore[arg-type]
