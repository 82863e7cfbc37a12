"""The vLLM worker extension that receives new policy weights during PPO.

vLLM mixes this class into each of its worker processes (`worker_extension_cls`), so the trainer
can call its methods through `LLM.collective_rpc`. Arguments cross a process boundary and are
serialized (tensors would arrive as nested lists), so the weights travel as one safetensors blob.
On the CPU build `model.load_weights` fails (parameters are repacked after loading and lose their
`weight_loader`), so we go through the worker's `reload_weights`, which handles that.
"""

from __future__ import annotations

from safetensors.torch import load


class WeightSyncExtension:
    """Methods added to every vLLM worker. `self` is the worker (it has `reload_weights`)."""

    weight_version: int = 0  # the version of the weights the engine was started from

    def load_weights_bytes(self, data: bytes, version: int) -> int:
        """Load a `safetensors.torch.save` blob of checkpoint-format weights; return `version`."""
        state = load(data)
        self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        self.weight_version = version
        return version

    def get_weight_version(self) -> int:
        return self.weight_version

    def set_weight_version(self, version: int) -> int:
        """Name the weights the engine was started from (e.g. a resumed PPO checkpoint's step)."""
        self.weight_version = version
        return version
