"""Rollouts for PPO: a vLLM engine that samples responses and takes new policy weights in place.

The engine is started once from the policy folder; after every PPO update the trainer sends the new
weights with `load_weights(state_dict, version)`. Each rollout records the weight version that
produced it, and `generate` refuses to sample from weights other than the ones the caller expects,
so a trainer never learns from responses of a policy it did not mean to use (no silent
off-policy drift).

The logprob of each sampled token is of the distribution it was sampled from: vLLM's processed
logprobs, log_softmax(logits / temperature) (after top-p, which PPO keeps at 1). The trainer
computes the same quantity by dividing its logits by the temperature, so the two differ only by
the engine's numerics (PPO's `logprob_mismatch`, corrected by truncated importance sampling).

`RolloutEngine` is a plain class (usable without Ray, e.g. in tests); `RolloutActor` is the same
class as a Ray actor, with vLLM's engine core in the actor's own process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import save
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from rlhf_ray.cluster import require_cuda
from rlhf_ray.config import KVCacheConfig
from rlhf_ray.memory import check_kv_fits, vllm_memory_args
from rlhf_ray.modeling import inspect_policies_in_vllms_process
from rlhf_ray.tokenizer import load_tokenizer

EXTENSION = "rlhf_ray.rl.vllm_extension.WeightSyncExtension"


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_ids: list[int]
    response_ids: list[int]  # ends with the stop token when finish_reason == "stop"
    logprobs: list[float]  # the sampling logprob of each response token
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    weight_version: int  # the version of the weights that sampled it


class StaleWeightsError(RuntimeError):
    """The engine holds other weights than the caller expects to sample from."""


class RolloutEngine:
    """A vLLM engine on the policy folder whose weights the trainer replaces between updates."""

    def __init__(self, model_dir: Path, max_model_len: int, sequences: int,
                 kv_cache: KVCacheConfig | None = None, seed: int = 0, dtype: str = "float32",
                 tensor_parallel_size: int = 1, weight_version: int = 0, role: str = "rollout engine"
                 ) -> None:
        # The KV cache holds `sequences` of up to max_model_len tokens at once (rlhf_ray/memory.py).
        # Tensor parallelism runs vLLM's own worker processes over the GPUs Ray gave this engine.
        require_cuda(role)
        self.stop_ids = list(load_tokenizer(Path(model_dir)).stop_ids)
        if dtype == "auto":  # decided here, on the engine's machine, not on the driver's
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        memory = vllm_memory_args(Path(model_dir), kv_cache or KVCacheConfig(), sequences, dtype,
                                  max_model_len)
        if "kv_cache_memory_bytes" in memory and not torch.cuda.is_available():
            check_kv_fits(role, int(memory["kv_cache_memory_bytes"]))
        self.kv_cache_bytes = memory.get("kv_cache_memory_bytes")
        self.dtype = dtype  # what the weights are sent in
        inspect_policies_in_vllms_process()
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=True, logprobs_mode="processed_logprobs", **memory,
                       tensor_parallel_size=tensor_parallel_size,
                       distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
                       worker_extension_cls=EXTENSION)
        if weight_version:
            self.llm.collective_rpc("set_weight_version", args=(weight_version,))

    def ready(self) -> bool:
        """True once the engine is up (lets a controller wait for an actor to start)."""
        return True

    def weights_dtype(self) -> str:
        """The dtype the engine holds its weights in (what a sync sends)."""
        return self.dtype

    @property
    def weight_version(self) -> int:
        """The workers' weight version; raises if they disagree (a sync half done)."""
        versions = set(self.llm.collective_rpc("get_weight_version"))
        if len(versions) != 1:
            raise RuntimeError(f"vLLM workers hold different weight versions: {sorted(versions)}")
        return versions.pop()

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the engine's weights by a Hugging Face-format state dict, as `version`, sent
        through Ray's object store (the path where no weight-sync group could be formed)."""
        # collective_rpc serializes its arguments (tensors would become lists): send one blob.
        # safetensors refuses tensors that share memory, as tied lm_head and embed_tokens do, so
        # each is cloned. Both names must be sent: on reload vLLM loads each layer separately and
        # a layer given no weights keeps its old ones (the tie is not restored).
        state = {name: tensor.detach().to("cpu").clone() for name, tensor in state_dict.items()}
        self._loaded(self.llm.collective_rpc("load_weights_bytes", args=(save(state), version)), version)

    def join_weight_sync(self, host: str, port: int, first_rank: int, world_size: int,
                         backend: str) -> list[int]:
        """Join every vLLM worker of this engine to the weight-sync group (weight_sync.py) as
        ranks first_rank, first_rank + 1, ...; returns once the whole group has joined."""
        return self.llm.collective_rpc("join_weight_sync",
                                       args=(host, port, first_rank, world_size, backend))

    def receive_weights(self, version: int) -> None:
        """Load the weights the policy streams over the weight-sync group, as `version`."""
        self._loaded(self.llm.collective_rpc("receive_weights", args=(version,)), version)

    def _loaded(self, reported: list[int], version: int) -> None:
        if any(v != version for v in reported):
            raise RuntimeError(f"weight sync to version {version} failed: workers report {reported}")
        # Cached key/value blocks of earlier prompts were computed by the old weights: reusing
        # them would mix two policies in one rollout (and its logprobs).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("weight sync: vLLM could not reset its prefix cache")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float, expected_version: int, seed: int | None = None,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """Sample one response per prompt (temperature 0: greedy) with the expected weights;
        prompt i is sampled with seed + i, or with seeds[i] when given."""
        version = self.weight_version
        if version != expected_version:
            raise StaleWeightsError(
                f"the rollout engine holds weight version {version}, the caller expected "
                f"version {expected_version}"
            )
        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_token_ids=self.stop_ids, logprobs=0, detokenize=False,
                           seed=seeds[i] if seeds else None if seed is None else seed + i)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        rollouts = []
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            response = list(completion.token_ids)
            # logprobs=0 returns, per position, the sampled token's logprob (and no alternatives).
            logprobs = [step[token].logprob for token, step in zip(response, completion.logprobs)]
            rollouts.append(Rollout(prompt_ids=list(prompt), response_ids=response,
                                    logprobs=logprobs, finish_reason=str(completion.finish_reason),
                                    weight_version=version))
        return rollouts

    def shutdown(self) -> None:
        """Stop vLLM's engine-core process (it would otherwise outlive the engine)."""
        self.llm.llm_engine.engine_core.shutdown()


@ray.remote
class RolloutActor(RolloutEngine):
    """A RolloutEngine in a Ray actor, which is a process of its own already: vLLM's engine core
    runs in it instead of in two more processes (engine core, worker), each of which imports vLLM
    again. On 2 CPU cores that cut 17 s from every engine start and some IPC from every step
    (compare-data of the demo: 52 s -> 36 s, the same samples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by vLLM when LLM() starts
        super().__init__(*args, **kwargs)
