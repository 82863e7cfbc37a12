"""Memory sizes, in one place: a model's shape, what a vLLM engine's KV cache must hold, and
what the machine has.

`rlhf-ray plan` reports these sizes, every vLLM engine (PPO rollouts, comparison sampling, Serve
replicas) asks vLLM for exactly the KV cache computed here, and a run on the embedded local Ray
checks the sum against this machine before it starts any engine. A fraction of the machine is
the wrong unit on a CPU: vLLM's CPU worker reserves `gpu_memory_utilization` x the NUMA node's
memory minus what the worker already holds, and node sizes differ from box to box (7.6, 14 and
24 GB were all seen), so one fraction is too much on one box and negative on the next.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import psutil

from rlhf_ray.config import KVCacheConfig, PPOConfig

GB = 1e9
# A sequence's KV cache is whole blocks: vLLM's CPU block is 128 tokens (a GPU's 16, so sizing
# in blocks of 128 is exact on a CPU and a little generous on a GPU).
KV_BLOCK_TOKENS = 128
# vLLM's default max_num_seqs for an `LLM` on a CPU: sequences beyond it wait their turn anyway.
MAX_ENGINE_SEQUENCES = 256
# What the processes cost before any weights or KV cache (RSS, measured 2026-12-02 on the 2-core
# CPU box): a vLLM engine (its actor with vLLM imported, the engine core and its worker) 2.1 GB;
# a torch role (a Ray actor with torch and transformers) 0.6 GB.
ENGINE_PROCESS_BYTES = 2.1 * GB
ROLE_PROCESS_BYTES = 0.6 * GB


class MachineMemoryError(MemoryError):
    """What a run's engines and models need does not fit the memory this machine reports."""


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_seq_len: int  # the model folder's context (max_position_embeddings)
    tied: bool  # lm_head shares the input embedding
    qkv_bias: bool = False  # Qwen2's biases on the q/k/v projections


def shape_from_folder(folder: Path) -> ModelShape:
    """The architecture in a Hugging Face folder's config.json (Llama/Qwen family)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (not a Hugging Face model folder)")
    c = json.loads(path.read_text())
    try:
        heads, hidden = c["num_attention_heads"], c["hidden_size"]
        return ModelShape(c["num_hidden_layers"], hidden, heads, c.get("num_key_value_heads") or heads,
                          c.get("head_dim") or hidden // heads, c["intermediate_size"], c["vocab_size"],
                          c["max_position_embeddings"], bool(c.get("tie_word_embeddings", False)),
                          c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r} (a Llama/Qwen config.json has it)") from None


def count_params(s: ModelShape, scalar_head: bool = False) -> int:
    """The Llama causal LM's parameters; with `scalar_head` the reward/value model's
    (LlamaForSequenceClassification: no lm_head, a bias-free hidden -> 1 score)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = s.hidden * (q + 2 * kv) + q * s.hidden + (q + 2 * kv) * s.qkv_bias
    mlp = 3 * s.hidden * s.intermediate  # gate, up, down
    layer = attention + mlp + 2 * s.hidden  # + two RMSNorm weights
    embedding = s.vocab * s.hidden
    head = s.hidden if scalar_head else (0 if s.tied else embedding)
    return embedding + s.layers * layer + s.hidden + head  # + the final norm


def kv_bytes_per_token(s: ModelShape, dtype_bytes: int) -> int:
    return 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes


# --------------------------------------------------------------------------- the KV cache


def kv_cache_bytes(s: ModelShape, dtype_bytes: int, sequences: int, seq_len: int,
                   kv: KVCacheConfig) -> int:
    """The KV cache an engine asks for: `sequences` at once of up to `seq_len` tokens (unless
    `kv` gives a token budget or a byte size). It always holds at least one full context."""
    if kv.bytes is not None:
        return kv.bytes
    per_token = kv_bytes_per_token(s, dtype_bytes)
    blocks_per_sequence = math.ceil(seq_len / KV_BLOCK_TOKENS)
    if kv.tokens is not None:
        blocks = max(math.ceil(kv.tokens / KV_BLOCK_TOKENS), blocks_per_sequence)
        return blocks * KV_BLOCK_TOKENS * per_token
    blocks = max(1, sequences) * blocks_per_sequence
    return math.ceil(round(blocks * kv.headroom, 6)) * KV_BLOCK_TOKENS * per_token  # 320 x 1.2 is 384


def engine_sequences(requested: int) -> int:
    """How many sequences an engine runs at once: what it is given, up to vLLM's batch limit."""
    return max(1, min(requested, MAX_ENGINE_SEQUENCES))


def rollout_sequences(ppo: PPOConfig) -> int:
    """Sequences one PPO rollout engine holds at once: its share of a step's samples, or of the
    held-out prompts (evaluation sends them all at once), whichever is more."""
    most = max(ppo.prompts_per_step * ppo.samples_per_prompt, ppo.eval_max_prompts)
    return engine_sequences(math.ceil(most / ppo.num_rollout_engines))


def vllm_memory_args(folder: Path, kv: KVCacheConfig, sequences: int, dtype: str,
                     seq_len: int | None = None) -> dict[str, int | float]:
    """The engine arguments that size an engine on `folder`'s model for `sequences` at once, each
    up to `seq_len` tokens (the engine's max_model_len; default the model's context):
    kv_cache_memory_bytes (or the explicit fraction) and max_num_seqs."""
    sequences = engine_sequences(sequences)
    if kv.memory_fraction is not None:
        return {"gpu_memory_utilization": kv.memory_fraction, "max_num_seqs": sequences}
    s = shape_from_folder(folder)
    dtype_bytes = 4 if dtype == "float32" else 2
    length = seq_len or s.max_seq_len
    return {"kv_cache_memory_bytes": kv_cache_bytes(s, dtype_bytes, sequences, length, kv),
            "max_num_seqs": sequences}


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class NodeMemory:
    node: int | None  # the NUMA node (None: no NUMA information; the whole machine)
    total: int
    available: int


def numa_node_memory() -> NodeMemory:
    """The NUMA node of this process's first allowed CPU, read the way vLLM's CPU worker reads it
    (free + file pages + reclaimable slab, clamped by a cgroup limit): its KV cache must fit here."""
    cpu = min(os.sched_getaffinity(0))
    nodes = sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    node = int(nodes[0].name[4:]) if nodes else None
    meminfo = Path(f"/sys/devices/system/node/node{node}/meminfo")
    if node is None or not meminfo.is_file():
        vm = psutil.virtual_memory()
        return NodeMemory(None, vm.total, vm.available)
    info = {}
    for line in meminfo.read_text().splitlines():  # "Node 0 MemTotal:  7956216 kB"
        parts = line.split()
        info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    total = info["MemTotal"]
    available = (info["MemFree"] + info["Active(file)"] + info["Inactive(file)"]
                 + info["SReclaimable"])
    limit, usage = _cgroup_bytes("memory.max"), _cgroup_bytes("memory.current")
    if limit is not None and limit < total:
        total, available = limit, max(0, min(available, limit - (usage or 0)))
    return NodeMemory(node, total, available)


def _cgroup_bytes(name: str) -> int | None:
    try:
        text = Path("/sys/fs/cgroup", name).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def check_kv_fits(role: str, kv_bytes: int, node: NodeMemory | None = None) -> None:
    """Refuse, with the numbers, a KV cache larger than the node has free (vLLM would fail at
    start, deep inside its worker process)."""
    node = node or numa_node_memory()
    if kv_bytes > node.available:
        where = "this machine" if node.node is None else f"NUMA node {node.node}"
        raise MachineMemoryError(
            f"{role}: a KV cache of {_gb(kv_bytes)} does not fit the {_gb(node.available)} "
            f"available on {where} (of {_gb(node.total)}); lower the sequences it holds at once "
            "or set its kv_cache.tokens")


def check_machine_fits(what: str, needs: dict[str, float], kv: dict[str, int]) -> None:
    """Before starting `what` on this machine: the roles' `needs` (bytes each, processes
    included) against the memory available, and their KV caches (`kv`, all on one node here)
    against the NUMA node's. The error lists every role's share."""
    vm, node = psutil.virtual_memory(), numa_node_memory()
    roles = ", ".join(f"{role} {_gb(n)}" for role, n in needs.items())
    if sum(needs.values()) > vm.available:
        raise MachineMemoryError(
            f"{what} needs {_gb(sum(needs.values()))} ({roles}); this machine has "
            f"{_gb(vm.available)} available of {_gb(vm.total)}. Use fewer engines or roles, "
            "smaller batches, or a cluster (cluster.address)")
    if kv:
        check_kv_fits(f"{what}: the KV caches of " + ", ".join(f"{r} ({_gb(b)})" for r, b in kv.items()),
                      sum(kv.values()), node)
