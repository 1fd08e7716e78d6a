from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier import BlockHasher, ConfigError, InvalidInputError, KVLayout, Namespace
from kvtier.keys import HASH_ALGOS, check_keys

LAYOUT = KVLayout(2, 2, 8, "float32", 4)


def hasher(algo: str = "sha256", **namespace: object) -> BlockHasher:
    fields: dict[str, object] = {"model_id": "llama", "layout_fingerprint": LAYOUT.fingerprint, **namespace}
    return BlockHasher(Namespace(**fields), 4, algo)  # type: ignore[arg-type]


@pytest.mark.parametrize("algo", HASH_ALGOS)
def test_keys_are_chained_16_byte_digests(algo: str) -> None:
    keys = hasher(algo).keys(list(range(10)))
    assert len(keys) == 2  # the partial tail of 2 tokens gets no key
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert hasher(algo).keys(list(range(8))) == keys
    # A block's key depends on its whole prefix.
    assert hasher(algo).keys([9, 1, 2, 3, 4, 5, 6, 7])[1] != keys[1]


def test_input_types_agree() -> None:
    tokens = [5, 1, 70000, 3, 2**32 - 1, 0, 9, 9]
    expected = hasher().keys(tokens)
    assert hasher().keys(np.array(tokens, dtype=np.int64)) == expected
    assert hasher().keys(torch.tensor(tokens)) == expected
    assert hasher().keys(tuple(tokens)) == expected


def test_extend_continues_a_chain() -> None:
    tokens = list(range(16))
    full = hasher().keys(tokens)
    assert hasher().extend(full[1], tokens[8:]) == full[2:]


@pytest.mark.parametrize("namespace", [
    {"model_id": "qwen"}, {"layout_fingerprint": "0" * 16}, {"tp_rank": 1, "tp_size": 2}, {"tenant_salt": "a"},
])
def test_namespace_separates_keys(namespace: dict[str, object]) -> None:
    assert hasher(**namespace).keys(range_list := list(range(8))) != hasher().keys(range_list)


@pytest.mark.parametrize("tokens", [[-1, 2, 3, 4], [2**32, 1, 2, 3], [1.5, 2.0, 3.0, 4.0], [[1, 2], [3, 4]]])
def test_bad_tokens_are_refused(tokens: list[object]) -> None:
    with pytest.raises(InvalidInputError):
        hasher().keys(np.array(tokens) if isinstance(tokens[0], list | float) else tokens)  # type: ignore[arg-type]


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        hasher("md5")
    with pytest.raises(ConfigError):
        Namespace("m", LAYOUT.fingerprint, tp_rank=2, tp_size=2)
    with pytest.raises(ConfigError):
        Namespace("", LAYOUT.fingerprint)


def test_check_keys() -> None:
    good = hasher().keys(list(range(8)))
    assert check_keys(good) == good
    for bad in ([b"short"], ["x" * 16], [good[0], good[0]]):
        with pytest.raises(InvalidInputError):
            check_keys(bad)  # type: ignore[arg-type]


_CHILD = """
from kvtier import BlockHasher, Namespace
for algo in ("sha256", "blake3", "xxh3_128"):
    print(BlockHasher(Namespace("m", "f" * 16, 1, 4, "t"), 16, algo).keys(list(range(1000)))[-1].hex())
"""


def test_keys_agree_across_interpreters_with_different_hash_seeds() -> None:
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.append(subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                                      check=True).stdout)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].split()) == 3
