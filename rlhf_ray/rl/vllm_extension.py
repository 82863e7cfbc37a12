"""The vLLM worker extension that receives new policy weights during PPO.

vLLM mixes this class into each of its worker processes (`worker_extension_cls`), so the trainer
can call its methods through `LLM.collective_rpc`. Two ways in:

- streamed (`join_weight_sync`, then `receive_weights` per sync): the worker joins the policy's
  weight-sync group (rlhf_ray/rl/weight_sync.py) and loads the buckets as they arrive;
- one blob (`load_weights_bytes`), where no group could be formed: rpc arguments are serialized
  (tensors would arrive as nested lists), so the weights travel as one safetensors blob.

Both load through the worker's `reload_weights`, once per sync over an iterator of every tensor:
vLLM reloads layer by layer and processes a layer once all its weights are in, so a fused layer
(q, k and v in one) is never processed half-loaded. On the CPU build `model.load_weights` alone
fails (parameters are repacked after loading and lose their `weight_loader`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from safetensors.torch import load

from rlhf_ray.rl import weight_sync


class _RotaryReloadFilter(logging.Filter):
    """vLLM warns at every reload that the rotary embedding "failed to load weights": it has
    none in the checkpoint (its cache is computed, and vLLM puts it back). Any other layer's
    warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())


class WeightSyncExtension:
    """Methods added to every vLLM worker. `self` is the worker (it has `reload_weights`)."""

    weight_version: int = 0  # the version of the weights the engine was started from
    sync_group: Any = None
    sync_device: torch.device = torch.device("cpu")

    def _reload(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> int:
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)  # type: ignore[attr-defined]
        self.weight_version = version
        return version

    def load_weights_bytes(self, data: bytes, version: int) -> int:
        """Load a `safetensors.torch.save` blob of checkpoint-format weights; return `version`."""
        return self._reload(load(data).items(), version)

    def join_weight_sync(self, host: str, port: int, first_rank: int, world_size: int,
                         backend: str) -> int:
        """Join the weight-sync group as rank first_rank + this worker's rank in its engine."""
        rank = first_rank + int(getattr(self, "rank", 0))
        if backend == "nccl":
            self.sync_device = torch.device("cuda", torch.cuda.current_device())
        store = weight_sync.connect_store(host, port, world_size)
        self.sync_group = weight_sync.join_group(store, rank, world_size, backend)
        return rank

    def receive_weights(self, version: int) -> int:
        """Load the tensors streamed over the weight-sync group as `version`; return it."""
        if self.sync_group is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        return self._reload(weight_sync.receive(self.sync_group, self.sync_device), version)

    def leave_weight_sync(self) -> None:
        self.sync_group = None

    def get_weight_version(self) -> int:
        return self.weight_version

    def set_weight_version(self, version: int) -> int:
        """Name the weights the engine was started from (e.g. a resumed PPO checkpoint's step)."""
        self.weight_version = version
        return version
