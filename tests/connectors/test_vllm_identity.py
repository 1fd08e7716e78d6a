"""The vLLM connector's default ``model_id`` (model_identity.py) and its supported-version check
(versions.py); neither needs vLLM."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kvtier_connectors.model_identity import SAMPLE_BYTES, model_identity
from kvtier_connectors.vllm.versions import SUPPORTED, TESTED, check_vllm_version, version_warning


def write_model(path: Path, weights: bytes, hidden: int = 64) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden}))
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_every_spelling_of_one_model_directory_gets_one_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "models" / "llama", b"w" * 100)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(model)
    copy = write_model(tmp_path / "elsewhere" / "copy-of-llama", b"w" * 100)
    ids = {model_identity(str(model)), model_identity("models/llama"), model_identity("./models/llama/"),
           model_identity(str(tmp_path / "link")), model_identity(str(copy))}
    assert len(ids) == 1
    assert next(iter(ids)).startswith("weights:")


def test_other_weights_or_config_get_another_id(tmp_path: Path) -> None:
    big = SAMPLE_BYTES * 3
    base = model_identity(str(write_model(tmp_path / "a", b"\0" * big)))
    tail_changed = bytearray(b"\0" * big)
    tail_changed[-1] = 1
    assert model_identity(str(write_model(tmp_path / "b", bytes(tail_changed)))) != base
    assert model_identity(str(write_model(tmp_path / "c", b"\0" * big, hidden=128))) != base
    assert model_identity(str(write_model(tmp_path / "d", b"\0" * (big + 1)))) != base


def test_a_hub_id_and_its_cached_snapshot_get_one_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    repo = cache / "models--org--name"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = write_model(repo / "snapshots" / commit, b"x" * 10)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_identity("org/name") == model_identity(str(snapshot))
    assert model_identity("org/absent") == "org/absent@main"
    assert model_identity("org/absent", "v2") == "org/absent@v2"
    assert model_identity("not-a-path-or-hub-id") == "not-a-path-or-hub-id"


def test_versions_outside_the_supported_range_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    assert set(TESTED) == {"0.32.0", "0.33.0"}
    for inside in ("0.32.0", "0.33.0", "0.33.1", "0.32.0+cpu", "0.33.0rc1"):
        assert version_warning(inside) is None, inside
    for outside in ("0.31.9", "0.34.0", "1.0.0", "dev"):
        message = version_warning(outside)
        assert message is not None and SUPPORTED in message and "0.33.0" in message, outside
    caplog.set_level(logging.WARNING)
    check_vllm_version(f"0.1.{os.getpid()}")
    check_vllm_version(f"0.1.{os.getpid()}")
    assert len([r for r in caplog.records if "supports vLLM" in r.getMessage()]) == 1
