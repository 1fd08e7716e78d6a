"""The SGLang backend's settings and keys: read from SGLang's extra config JSON, no SGLang needed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvtier.errors import ConfigError, InvalidInputError
from kvtier.layout import KVLayout
from kvtier_connectors.model_identity import model_identity
from kvtier_connectors.sglang import settings as settings_module
from kvtier_connectors.sglang.settings import (
    PageKeys,
    Shard,
    StorageSettings,
    kv_format,
    rank_directory,
    sglang_model_id,
)

pytestmark = pytest.mark.sglang

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
HASHES = ["ab" * 32, "cd" * 32]


def extra(**kvtier: Any) -> dict[str, Any]:
    return {"backend_name": "kvtier", "module_path": "kvtier_connectors.sglang", "class_name": "KvtierStorage",
            "interface_v1": 1, "kvtier": kvtier}


def test_defaults_are_an_embedded_store_named_after_sglangs_model() -> None:
    settings = StorageSettings.from_extra_config(extra(), "org/model")
    assert (settings.store, settings.model_id, settings.tenant_salt) == ("embedded", "org/model", "")
    assert settings.store_config().daemon.connect == ""


@pytest.mark.parametrize(("config", "message"), [
    ({"interface_v1": 0}, "interface_v1"),
    ({"kvtier": "daemon"}, "must be a table"),
    ({"kvtier": {"stroe": "daemon"}}, "unknown kvtier key"),
    ({"kvtier": {"store": "redis"}}, "store must be"),
    ({"kvtier": {"address": "unix:/x.sock"}}, "store='daemon'"),
    ({"kvtier": {"config": ["host"]}}, "mapping"),
])
def test_bad_settings_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StorageSettings.from_extra_config({**extra(), **config}, "org/model")


def test_a_model_is_required() -> None:
    with pytest.raises(ConfigError, match="model_id"):
        StorageSettings.from_extra_config(extra(), "")
    assert StorageSettings.from_extra_config(extra(model_id="m"), "").model_id == "m"


def test_the_default_model_id_names_the_weights_and_the_options_that_change_their_kv(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SGLang's storage config names the model by its --model-path string: a checkpoint quantized at load
    (--quantization fp8) and the same one unquantized, on one daemon, would load each other's KV."""
    checkpoint = tmp_path / "llama"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llama"}')
    (checkpoint / "model.safetensors").write_bytes(b"w" * 100)

    def published(**options: Any) -> Any:
        fields = {"model_path": str(checkpoint), "revision": None, "quantization": None,
                  "quantization_param_path": None, "modelopt_quant": None, "json_model_override_args": "{}",
                  "rl_quant_profile": None, **options}
        return lambda: SimpleNamespace(**fields)

    monkeypatch.setattr(settings_module, "_sglang_model", published())
    plain = sglang_model_id(str(checkpoint))
    assert plain == model_identity(str(checkpoint)) and plain.startswith("weights:")
    ids = {plain}
    for options in ({"quantization": "fp8"}, {"quantization": "awq"}, {"quantization_param_path": "/s.json"},
                    {"json_model_override_args": '{"rope_scaling": {"factor": 2}}'}):
        monkeypatch.setattr(settings_module, "_sglang_model", published(**options))
        ids.add(sglang_model_id(str(checkpoint)))
    assert len(ids) == 5
    # Nothing published (a process other than SGLang's scheduler): the storage config's name, as a model path.
    monkeypatch.setattr(settings_module, "_sglang_model", lambda: None)
    assert sglang_model_id(str(checkpoint)) == plain and sglang_model_id("not-a-path") == "not-a-path"
    # A model_id setting wins, and the weights are then not read.
    named = StorageSettings.from_extra_config(extra(model_id="m"), lambda: pytest.fail("weights hashed"))
    assert named.model_id == "m"
    assert StorageSettings.from_extra_config(extra(), lambda: plain).model_id == plain


def test_config_overrides_the_toml_file_table_by_table(tmp_path: Path) -> None:
    path = tmp_path / "kvtier.toml"
    path.write_text('hash_algo = "blake3"\n[host]\ncapacity_bytes = "2MiB"\npolicy = "lru"\n')
    settings = StorageSettings.from_extra_config(
        extra(config_path=str(path), config={"host": {"capacity_bytes": "4MiB"}}), "m")
    config = settings.store_config()
    assert (config.host.capacity_bytes, config.host.policy, config.hash_algo) == (4 << 20, "lru", "blake3")


@pytest.mark.parametrize(("text", "message"), [(None, "cannot read"), ("[host", "not valid TOML")])
def test_a_bad_config_file_is_refused(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "kvtier.toml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        StorageSettings.from_extra_config(extra(config_path=str(path)), "m").store_config()


def test_a_daemon_is_reached_over_its_unix_socket() -> None:
    assert StorageSettings.from_extra_config(extra(store="daemon"), "m").store_config().daemon.connect == "unix"
    settings = StorageSettings.from_extra_config(extra(store="daemon", address="unix:/run/k.sock"), "m")
    assert settings.store_config().daemon.connect == "unix:/run/k.sock"
    from_config = extra(store="daemon", config={"daemon": {"connect": "unix:/run/c.sock"}})
    assert StorageSettings.from_extra_config(from_config, "m").store_config().daemon.connect == "unix:/run/c.sock"
    per_stage = StorageSettings.from_extra_config(extra(store="daemon", address="unix:/run/k{pp_rank}.sock"), "m")
    assert per_stage.store_config(pp_rank=1).daemon.connect == "unix:/run/k1.sock"
    with pytest.raises(ConfigError, match="Unix socket"):
        StorageSettings.from_extra_config(extra(store="daemon", address="tcp://h:1"), "m").store_config()


def test_keys_are_deterministic_and_distinct_per_namespace() -> None:
    settings = StorageSettings(model_id="org/model")
    keys = PageKeys(settings, LAYOUT, Shard()).keys(HASHES)
    assert keys == PageKeys(settings, LAYOUT, Shard()).keys(HASHES)
    assert len(set(keys)) == 2 and all(len(key) == 16 for key in keys)
    others = [
        PageKeys(StorageSettings(model_id="org/other"), LAYOUT, Shard()),
        PageKeys(settings, KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_tokens=4),
                 Shard()),
        PageKeys(settings, LAYOUT, Shard(tp_rank=1, tp_size=2)),
        PageKeys(settings, LAYOUT, Shard(pp_rank=1, pp_size=2)),
        PageKeys(settings, LAYOUT, Shard(cp_rank=1, cp_size=2)),
        PageKeys(settings, LAYOUT, Shard(dcp_rank=0, dcp_size=2)),
        PageKeys(settings, LAYOUT, Shard(dcp_rank=1, dcp_size=2)),
        PageKeys(StorageSettings(model_id="org/model", tenant_salt="t"), LAYOUT, Shard()),
        PageKeys(settings, LAYOUT, Shard(), "float8_e5m2"),
    ]
    for other in others:
        assert not set(other.keys(HASHES)) & set(keys)


def test_a_replicated_shard_drops_the_tensor_parallel_rank() -> None:
    class Config:
        tp_rank, tp_size, pp_rank, pp_size, attn_cp_rank, attn_cp_size = 1, 2, 0, 1, 0, 1

    assert Shard.of(Config(), replicated=False) == Shard(tp_rank=1, tp_size=2)
    assert Shard.of(Config(), replicated=True) == Shard()


def test_decode_context_parallel_ranks_of_an_mla_model_never_share_keys() -> None:
    """With DCP each rank's latent page holds another share of the page's tokens: the DCP rank stays in the
    keys of a replicated (MLA) shard, or one rank would load another's share."""
    class Config:
        tp_rank, tp_size, pp_rank, pp_size, attn_cp_rank, attn_cp_size, dcp_rank, dcp_size = 3, 4, 0, 1, 0, 1, 1, 2

    assert Shard.of(Config(), replicated=True) == Shard(dcp_rank=1, dcp_size=2)
    settings = StorageSettings(model_id="m")
    ranks = [PageKeys(settings, LAYOUT, Shard(dcp_rank=rank, dcp_size=2)).keys(HASHES) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_a_hash_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="strings"):
        PageKeys(StorageSettings(model_id="m"), LAYOUT, Shard()).keys([b"\x00" * 32])  # type: ignore[list-item]


def test_fp8_formats_of_uint8_pools_are_named_and_never_share_keys() -> None:
    def fmt(name: str, rocm: bool = False) -> str:
        return kv_format(StorageSettings(model_id="m", kv_cache_dtype=name), "uint8", rocm=rocm)

    assert (fmt("fp8_e4m3"), fmt("auto"), fmt("fp8_e5m2")) == ("float8_e4m3fn", "float8_e4m3fn", "float8_e5m2")
    assert fmt("fp8_e5m2", rocm=True) == fmt("fp8_e4m3", rocm=True) == "float8_e4m3fnuz"  # SGLang's ROCm fp8
    assert kv_format(StorageSettings(model_id="m"), "bfloat16") == "bfloat16"
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="uint8", block_tokens=4)
    settings = StorageSettings(model_id="m")
    e4m3, e5m2 = (PageKeys(settings, layout, Shard(), fmt(name)) for name in ("fp8_e4m3", "fp8_e5m2"))
    assert not set(e4m3.keys(HASHES)) & set(e5m2.keys(HASHES))
    assert e4m3.scope != e5m2.scope


def test_a_setting_that_contradicts_sglangs_fp8_format_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uint8 pool's bytes are the format SGLang runs (--kv-cache-dtype): a setting naming another would
    store e4m3 pages under e5m2 keys, which a server that really runs e5m2 would then read as its own."""
    monkeypatch.setattr(settings_module, "_sglang_kv_cache_dtype", lambda: "fp8_e4m3")
    with pytest.raises(ConfigError, match="contradicts"):
        kv_format(StorageSettings(model_id="m", kv_cache_dtype="fp8_e5m2"), "uint8", rocm=False)
    assert kv_format(StorageSettings(model_id="m", kv_cache_dtype="fp8_e4m3"), "uint8", rocm=False) == "float8_e4m3fn"
    # SGLang keeps both as e4m3fnuz on ROCm: no contradiction in the bytes.
    assert kv_format(StorageSettings(model_id="m", kv_cache_dtype="fp8_e5m2"), "uint8", rocm=True) == "float8_e4m3fnuz"
    # SGLang's "auto" names no format (the checkpoint's): the setting says which.
    monkeypatch.setattr(settings_module, "_sglang_kv_cache_dtype", lambda: "auto")
    assert kv_format(StorageSettings(model_id="m", kv_cache_dtype="fp8_e5m2"), "uint8", rocm=False) == "float8_e5m2"


def test_an_epoch_changes_every_key_and_the_scope_spans_the_shards() -> None:
    settings = StorageSettings(model_id="m")
    keys = PageKeys(settings, LAYOUT, Shard())
    before = keys.keys(HASHES)
    keys.at(3)
    assert keys.epoch == 3 and not set(keys.keys(HASHES)) & set(before)
    keys.at(0)
    assert keys.keys(HASHES) == before
    assert PageKeys(settings, LAYOUT, Shard(tp_rank=1, tp_size=2)).scope == keys.scope


def test_ranks_of_a_parallel_server_get_their_own_disk_directory(tmp_path: Path) -> None:
    class Config:
        tp_rank, tp_size, pp_rank, pp_size, attn_cp_rank, attn_cp_size, dp_rank = 1, 2, 0, 1, 0, 1, 0

    settings = StorageSettings(model_id="m", config={"disk": {"paths": [str(tmp_path)]}})
    assert settings.store_config().disk.paths == (str(tmp_path),)
    paths = settings.store_config(rank_directory(Config())).disk.paths
    assert paths == (str(tmp_path / "rank-tp1of2-pp0of1-cp0of1-dp0"),)
    single = Config()
    single.tp_rank, single.tp_size = 0, 1
    assert rank_directory(single) == ""
