"""SGLang's real host pools and storage factory on the CPU, for the kvtier backend's tests (and their child process).

- SGLang's host pool classes take the device pool's buffers as a description (``MHABufferInfo`` /
  ``MLABufferInfo``: per-layer tensors, pointer tables, geometry) and allocate their own host buffer. Built
  here over CPU tensors standing in for the GPU's, with ``pin_memory=False``, they are the real classes with
  their real host buffers; only their device-side transfer methods (CUDA kernels) are never called.
- ``token_kv`` reads one token's K and V (or latent) straight from a pool's host buffer, indexing each host
  layout by hand, so the tests compare pages without going through the backend's own page views.
- ``open_backend`` builds the backend as SGLang's cache controller does: ``StorageBackendFactory`` with
  ``"dynamic"``, then ``register_mem_pool_host``. ``Daemon`` is a real ``kvtier serve`` for it to connect to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

if torch.version.cuda is None:
    # torchvision's PyPI wheel is a CUDA build whose compiled ops cannot load over CPU torch, and 0.28 registers
    # fake kernels for these two ops without checking that they exist. Declaring their schemas (the ones its
    # C++ library declares) lets its Python modules import, which SGLang's model configs need.
    _TORCHVISION = torch.library.Library("torchvision", "DEF")
    _TORCHVISION.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo, MLABufferInfo
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_storage_hash_str

LAYERS, HEADS, HEAD_DIM, PAGE_TOKENS, LATENT_DIM = 2, 2, 8, 4, 12
DEVICE_TOKENS = 64
HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
KINDS = ("mha", "mla")
# The kvtier layouts these pools make (for a daemon started with --layout).
LAYOUT_ARGS = {
    "mha": f"num_layers={LAYERS},num_kv_heads={HEADS},head_dim={HEAD_DIM},dtype=float32,block_tokens={PAGE_TOKENS}",
    "mla": f"num_layers={LAYERS},num_kv_heads=1,head_dim={LATENT_DIM},dtype=float32,block_tokens={PAGE_TOKENS},"
           "kind=latent",
}


def _pointers(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


def mha_pool(layout: str, *, v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, layers: int = LAYERS,
             heads: int = HEADS, head_dim: int = HEAD_DIM, page_tokens: int = PAGE_TOKENS,
             device_tokens: int = DEVICE_TOKENS, packed_draft_layers: int = 0) -> MHATokenToKVPoolHost:
    """A host pool of ``2 * device_tokens`` tokens (SGLang's default ratio), over stand-in device buffers.

    ``packed_draft_layers`` one-layer draft buffers of the target's geometry are packed into the pool, as
    SGLang packs an EAGLE draft layer into the target's host pool.
    """
    v_head_dim = v_head_dim or head_dim

    def info(num_layers: int) -> MHABufferInfo:
        k = tuple(torch.zeros(device_tokens, heads, head_dim, dtype=dtype) for _ in range(num_layers))
        v = tuple(torch.zeros(device_tokens, heads, v_head_dim, dtype=dtype) for _ in range(num_layers))
        return MHABufferInfo(
            buffers=KVBuffers(k=k, v=v, k_data_ptrs=_pointers(k), v_data_ptrs=_pointers(v), layout=KVBufferLayout.NHD),
            page_size=page_tokens, head_num=heads, head_dim=head_dim, v_head_dim=v_head_dim, dtype=dtype,
            device=torch.device("cpu"))

    return MHATokenToKVPoolHost(info(layers), 2.0, 0, page_tokens, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=device_tokens, start_layer=0, end_layer=layers,
                                draft_buffer_infos=tuple(info(1) for _ in range(packed_draft_layers)))


def mla_pool(layout: str) -> MLATokenToKVPoolHost:
    rows = tuple(torch.zeros(DEVICE_TOKENS, 1, LATENT_DIM) for _ in range(LAYERS))
    info = MLABufferInfo(buffers=rows, data_ptrs=_pointers(rows), layer_indices=tuple(range(LAYERS)),
                         device_layer_num=LAYERS, page_size=PAGE_TOKENS, kv_lora_rank=LATENT_DIM - 4,
                         qk_rope_head_dim=4, kv_cache_dim=LATENT_DIM, dtype=torch.float32, device=torch.device("cpu"))
    return MLATokenToKVPoolHost(info, 2.0, 0, PAGE_TOKENS, layout, pin_memory=False, device="cpu",
                                device_capacity_tokens=DEVICE_TOKENS, start_layer=0, end_layer=LAYERS,
                                target_layer_num=LAYERS)


def make_pool(kind: str, layout: str) -> Any:
    return mha_pool(layout) if kind == "mha" else mla_pool(layout)


def token_kv(pool: Any, token: int) -> torch.Tensor:
    """A view of token ``token``'s KV in ``pool``'s host buffer, shaped ``(planes, layers, heads, head_dim)``."""
    buffer = pool.kv_buffer if isinstance(pool, MHATokenToKVPoolHost) else pool.kv_buffer.unsqueeze(0)
    if pool.layout == "layer_first":  # (planes, layers, tokens, heads, dim)
        return buffer[:, :, token]
    if pool.layout == "page_first":  # (planes, tokens, layers, heads, dim)
        return buffer[:, token]
    # page_first_direct: (planes, pages, layers, page tokens, heads, dim)
    return buffer[:, token // pool.page_size, :, token % pool.page_size]


def fill(pool: Any, host_indices: torch.Tensor, seed: int) -> None:
    """Random KV in the tokens ``host_indices`` of ``pool``."""
    generator = torch.Generator().manual_seed(seed)
    for token in host_indices.tolist():
        view = token_kv(pool, token)
        view.copy_(torch.randn(view.shape, generator=generator).to(view.dtype))


def page_hashes(num_pages: int, first_token: int = 0) -> list[str]:
    """SGLang's own chained page hashes of a prompt of ``num_pages`` pages."""
    tokens = list(range(first_token, first_token + num_pages * PAGE_TOKENS))
    hashes: list[str] = get_storage_hash_str(tokens, None, page_size=PAGE_TOKENS)
    return hashes


def extra_config(**kvtier: Any) -> dict[str, Any]:
    return {"backend_name": "kvtier", "module_path": "kvtier_connectors.sglang", "class_name": "KvtierStorage",
            "interface_v1": 1, "kvtier": kvtier}


def storage_config(extra: dict[str, Any] | None, *, mla: bool = False, tp_rank: int = 0,
                   tp_size: int = 1, metrics: bool = False) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=metrics,
                                is_page_first_layout=False, model_name="org/model", extra_config=extra)


def open_backend(pool: Any, *, tp_rank: int = 0, tp_size: int = 1, metrics: bool = False, **kvtier: Any) -> Any:
    """The backend, created and registered as SGLang's cache controller does it."""
    config = storage_config(extra_config(**kvtier), mla=isinstance(pool, MLATokenToKVPoolHost), tp_rank=tp_rank,
                            tp_size=tp_size, metrics=metrics)
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    backend.register_mem_pool_host(pool)
    return backend


class Daemon:
    """A real ``kvtier serve`` in a subprocess, serving one layout on a short Unix socket path."""

    def __init__(self, layout_arg: str, *extra_args: str) -> None:
        self.workdir = tempfile.mkdtemp(prefix="kvs", dir="/tmp")  # a Unix socket path has at most 107 bytes
        self.address = f"unix:{os.path.join(self.workdir, 'd.sock')}"
        self.log = Path(self.workdir) / "daemon.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvtier.daemon", "serve", "--socket", self.address[5:], "--pool", "1MiB",
                 "--metrics-port", "0", "--layout", layout_arg, *extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "daemon ready" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the daemon did not start:\n{self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(60) == 0, self.log.read_text()
