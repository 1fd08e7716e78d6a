"""Asynchronous copies between caller memory and the host arena: a CUDA backend and a CPU backend."""

from __future__ import annotations

import torch

from kvtier.config import TransferConfig
from kvtier.errors import ConfigError
from kvtier.transfer.base import CopyPair, Direction, DoneCallback, Transfer, TransferEngine, submit_or_fail
from kvtier.transfer.cpu import CpuTransferEngine


def make_transfer_engine(config: TransferConfig) -> TransferEngine:
    """The backend the config names; ``"auto"`` is CUDA where torch sees a GPU, else CPU threads."""
    backend = config.backend
    if backend == "auto":
        backend = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("transfer.backend = 'cuda' but torch sees no CUDA device")
        from kvtier.transfer.cuda import CudaTransferEngine

        return CudaTransferEngine(config.num_streams)
    return CpuTransferEngine(config.num_workers)


__all__ = ["CopyPair", "CpuTransferEngine", "Direction", "DoneCallback", "Transfer", "TransferEngine",
           "make_transfer_engine", "submit_or_fail"]
