"""One typed config per run: every stage's settings, loaded from YAML and validated.

Unknown keys are errors, every field is documented, and a bad value is reported with the YAML
file, the line and the dotted field name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf_ray.run import MODELS

# GPT-4's split pattern, the one rustbpe and tiktoken's cl100k use.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


# Head sizes vLLM 0.32's CPU attention kernels accept (GPU kernels accept these too).
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file, line and field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


# --------------------------------------------------------------------------- data


class DemoDataConfig(Section):
    """The generated demo world: facts about countries written as documents, chats, comparisons."""

    seed: int = Field(0, description="Seed of every random choice in the generated data.")
    num_countries: int | None = Field(
        None, ge=10, description="Use only the first N countries of the built-in world (None: all)."
    )
    rl_fraction: float = Field(
        0.2, gt=0, lt=0.5,
        description="Fraction of countries kept out of SFT and reward data and used for RL prompts.",
    )
    eval_fraction: float = Field(
        0.2, gt=0, lt=0.5,
        description="Fraction of countries held out of SFT, reward and RL data, used only to evaluate.",
    )
    documents_per_country: int = Field(
        6, ge=1, description="Pretraining documents per country (articles, FAQ pages, quiz sheets)."
    )
    conversations_per_country: int = Field(
        10, ge=1, description="SFT conversations per SFT country."
    )
    comparisons_per_country: int = Field(
        10, ge=1, description="Reward-model comparisons per country."
    )
    demonstration_faults: float = Field(
        0.75, ge=0, le=1, description="Fraction of SFT answers written with a demonstrator's habit "
        "(most often a pleasantry, \"Hope this helps!\"; else a fact nobody asked for, or a hedge). "
        "The SFT model learns the habits; rankings can remove them. 0: clean demonstrations.",
    )
    prompts_per_country: int = Field(8, ge=1, description="RL prompts per RL/eval country.")


class DataConfig(Section):
    """Where each stage's records come from. Formats: see README, 'Record formats'."""

    demo: DemoDataConfig | None = Field(
        default_factory=DemoDataConfig,
        description="Generate the demo data into <run>/data/ and use it for every stage left empty "
        "below. Set to null to use only your own files.",
    )
    pretrain: list[Path] = Field(
        default_factory=list, description="Pretraining text: .txt files or .jsonl/.parquet with `text`."
    )
    sft: list[Path] = Field(default_factory=list, description="SFT conversations (.jsonl/.parquet).")
    sft_eval: list[Path] = Field(default_factory=list, description="Held-out SFT conversations.")
    reward: list[Path] = Field(default_factory=list, description="Comparisons for the reward model.")
    reward_eval: list[Path] = Field(default_factory=list, description="Held-out comparisons.")
    rl: list[Path] = Field(default_factory=list, description="RL prompts (`prompt`, `ground_truth`).")
    rl_eval: list[Path] = Field(default_factory=list, description="Held-out RL prompts.")


# --------------------------------------------------------------------------- tokenizer and model


class TokenizerConfig(Section):
    vocab_size: int = Field(
        4096, ge=262, le=1 << 20,
        description="Size of the trained vocabulary, the chat special tokens included.",
    )
    pattern: str = Field(GPT4_SPLIT_PATTERN, description="Regex that splits text before BPE.")
    max_train_chars: int = Field(
        200_000_000, ge=1, description="Train the BPE on at most this many characters of the corpus."
    )
    pretrained: Path | None = Field(
        None,
        description="Use the tokenizer of this Hugging Face folder instead of training one "
        "(set together with model.pretrained).",
    )


class ModelConfig(Section):
    """A Llama-architecture causal LM. Reward and value models add a scalar head to it."""

    pretrained: Path | None = Field(
        None,
        description="Start from this Hugging Face model folder (Llama/Qwen family) instead of "
        "pretraining one; the architecture fields below are then ignored.",
    )
    hidden_size: int = Field(256, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Number of transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads (query heads).")
    num_kv_heads: int = Field(4, ge=1, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(768, ge=8, description="Hidden width of the SwiGLU MLP.")
    max_seq_len: int = Field(512, ge=16, description="Context length in tokens.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(
        True, description="Share the input embedding and the output head (saves parameters)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        head_size = self.hidden_size // self.num_heads
        if head_size not in VLLM_HEAD_SIZES:
            raise ValueError(
                f"the head size hidden_size/num_heads = {head_size} is not one vLLM's attention "
                f"supports on every device; use one of {VLLM_HEAD_SIZES}"
            )
        return self


# --------------------------------------------------------------------------- training stages


class Resources(Section):
    """Ray Train workers for one stage (or one actor role in PPO)."""

    num_workers: int = Field(1, ge=1, description="Data-parallel workers.")
    use_gpu: bool = Field(False, description="Give each worker a GPU (NCCL; bf16 autocast).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the workers."
    )
    placement_timeout_s: float = Field(
        600.0, gt=0, description="On a cluster joined (which may autoscale): how long to wait for "
        "the workers' resources, saying what is missing, before giving up.",
    )


class Optim(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps, then cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")


class TrainStage(Section):
    """Settings shared by pretraining, SFT and reward-model training."""

    steps: int = Field(100, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        32, ge=1, description="Sequences (or comparison pairs) per optimizer step, all workers together."
    )
    micro_batch_size: int = Field(
        8, ge=1, description="Sequences per forward pass per worker; the rest is gradient accumulation. "
        "A step's examples go into micro-batches shortest first, so smaller ones pad less."
    )
    eval_every: int = Field(50, ge=1, description="Evaluate on held-out data every N steps.")
    checkpoint_every: int = Field(50, ge=1, description="Save resumable state every N steps.")
    optim: Optim = Field(default_factory=Optim, description="Optimizer and schedule.")
    resources: Resources = Field(default_factory=Resources, description="Ray Train workers.")
    max_failures: int = Field(
        2, ge=0, description="Restarts from the last checkpoint after a worker dies."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model. fsdp: parameters, gradients and "
        "optimizer state are sharded over the workers (FSDP2, one unit per decoder layer), for "
        "models that do not fit one device.",
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute dtype (bf16 autocast keeps float32 weights). auto: bfloat16 on GPUs and "
        "on CPUs with native bf16 (AVX512-BF16/AMX; 2.3x faster than float32 on the demo), else float32.",
    )

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> TrainStage:
        if self.batch_size < self.resources.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least resources.num_workers "
                             f"({self.resources.num_workers}): every worker needs an example")
        return self


class PretrainConfig(TrainStage):
    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")


class SFTConfig(TrainStage):
    """Conversations are padded per micro-batch; the loss covers the assistant's tokens only."""


class RewardConfig(TrainStage):
    """batch_size and micro_batch_size count comparisons; all pairs of one go in the same batch."""

    likelihood_weight: float = Field(
        0.0, ge=0, description="w in the reward model's score: the scalar head's value plus w times "
        "the mean log-probability the reward model's own language model gives the response's "
        "tokens (trained together by the same Bradley-Terry loss; saved in its config.json, so "
        "PPO, evaluation and /v1/score read it the same way). 0: the head alone (InstructGPT's). "
        "The head learns the labeler's taste quickly but facts slowly; the likelihood brings what "
        "sft/ knows (a false fact is unlikely): on the demo 0.70 -> 0.83 held-out accuracy. PPO "
        "then starts its value model from sft/, not from this model (docs/demo.md).",
    )
    lm_loss_weight: float = Field(
        0.0, ge=0, description="Weight of a language-model loss on each comparison's best response "
        "(its mean per-token cross-entropy), added to the Bradley-Terry loss. The Bradley-Terry "
        "loss alone also trains the likelihood term, pushing up whatever tells a better response "
        "from a worse one, until the reward model's language model no longer knows which fact "
        "answers which question; this loss keeps it knowing (a text-generation regulariser, as in "
        "Yang et al. 2024's generalisable reward models). The stage's logged `loss` includes it; "
        "`eval_loss` is the Bradley-Terry loss alone. Needs likelihood_weight > 0.",
    )
    likelihood_gate: bool = Field(
        False, description="Weigh each response token's log-probability in the likelihood term by "
        "g = 2 sigmoid(a linear function of the reward model's hidden state at that token), "
        "learned with the rest and starting at g = 1 (the plain mean). The plain mean counts every "
        "token alike, so a right answer in a form sft/ never writes (a bare \"Paris.\", its first "
        "word unlikely) scores as if it were wrong, and the head learns to cancel the likelihood, "
        "imprecisely; the gate learns which tokens tell what the model knows. On the demo it "
        "lifts held-out accuracy from 0.83 to 0.92 (0.93 with freeze_embeddings), yet PPO against "
        "it lost some of SFT's right answers in 5 of 7 runs (exact match 0.94-0.96 against 0.97), "
        "so the demo leaves it off (docs/demo.md). Saved in config.json and "
        "likelihood_gate.safetensors. Needs likelihood_weight > 0.",
    )
    freeze_embeddings: bool = Field(
        False, description="Keep the token embeddings (in and out: the tied table, or also a kept "
        "lm_head) as sft/ learned them while the rest trains. The comparisons and the language-"
        "model loss otherwise move the embeddings of the names they mention, so the likelihood "
        "term comes to prefer what it was trained on: on the demo, after \"The capital of\" in a "
        "reply to a question about a held-out country, a trained-on country's name. Frozen, the "
        "demo's reward model ranks 0.849 / 0.854 / 0.834 of the held-out pairs right (seeds 0 / "
        "1 / 2) instead of 0.832 / 0.833 / 0.831, and a reply about a trained-on country "
        "outscores the right answer to 4-9 of 65 held-out questions instead of 13-17 "
        "(docs/demo.md).",
    )

    @model_validator(mode="after")
    def _likelihood_options_need_the_likelihood(self) -> RewardConfig:
        if self.likelihood_weight:
            return self
        if self.lm_loss_weight:
            raise ValueError(f"reward.lm_loss_weight {self.lm_loss_weight} keeps the likelihood term's "
                             "language model; with reward.likelihood_weight 0 there is none: set "
                             "likelihood_weight > 0 or lm_loss_weight 0")
        if self.likelihood_gate:
            raise ValueError("reward.likelihood_gate weighs the likelihood term's tokens; with "
                             "reward.likelihood_weight 0 there is none: set likelihood_weight > 0 "
                             "or likelihood_gate false")
        return self


class DPOConfig(TrainStage):
    """Direct preference optimisation: sft/ trained on the reward model's comparisons (data.reward
    and compare/'s rankings, every pair of a ranking) against sft/ itself, frozen, as the
    reference; no reward model, no sampling. batch_size and micro_batch_size count comparisons;
    all pairs of one go in the same batch."""

    beta: float = Field(
        0.1, gt=0, description="How far the policy may move from the reference: the implicit "
        "reward is beta * log(pi / ref). Smaller lets it move further (sigmoid); for ipo the "
        "log-ratio margin is pulled toward 1 / (2 beta).",
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's -log sigmoid(beta * margin) (Rafailov et al. "
        "2023). ipo: (margin - 1/(2 beta))^2 (Azar et al. 2023), which stops at a finite margin "
        "instead of pushing the rejected response's probability toward zero.",
    )
    optim: Optim = Field(default_factory=lambda: Optim(lr=1e-5), description="Optimizer and "
                         "schedule (a small lr: DPO starts from a trained model).")


class KVCacheConfig(Section):
    """The KV cache a vLLM engine reserves. By default exactly what its concurrent sequences need:
    sequences x context (in whole blocks of 128 tokens) x layers x 2 (K and V) x KV heads x head
    size x dtype bytes, times `headroom`, asked of vLLM as `kv_cache_memory_bytes` on a CPU and a
    GPU alike. Set at most one of `tokens`, `bytes`, `memory_fraction`."""

    tokens: int | None = Field(
        None, ge=1, description="Size the cache for this many tokens instead (rounded up to whole "
        "blocks, and at least one full context).",
    )
    bytes: int | None = Field(None, ge=1, description="Reserve exactly this many bytes.")
    memory_fraction: float | None = Field(
        None, gt=0, lt=1, description="Explicit override: vLLM's gpu_memory_utilization. On a "
        "GPU the share of its memory for the engine; on a CPU the share of the NUMA node's memory "
        "minus what the worker already holds, which differs from machine to machine (and can be "
        "negative): prefer tokens or bytes there.",
    )
    headroom: float = Field(
        1.2, ge=1, le=4, description="Multiplies the computed size, so a full batch never waits "
        "for a block (not applied to tokens or bytes).",
    )

    @model_validator(mode="after")
    def _one_way(self) -> KVCacheConfig:
        chosen = [k for k in ("tokens", "bytes", "memory_fraction") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set at most one of tokens, bytes, memory_fraction (got {', '.join(chosen)})")
        return self


def _kv_cache(what: str) -> Any:
    return Field(default_factory=KVCacheConfig, description=f"KV cache of {what} (sized from "
                 "what it holds at once; see KVCacheConfig).")


class _NoFraction(Section):
    """Sections that once took `vllm_memory_fraction` say where it went."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "vllm_memory_fraction" in data:
            raise ValueError("vllm_memory_fraction is gone: the KV cache is now sized from what the "
                             "engine holds at once; to keep a fraction set kv_cache.memory_fraction "
                             "instead (or kv_cache.tokens / kv_cache.bytes)")
        return data


class RoleResources(Section):
    """What one PPO actor reserves on the Ray cluster."""

    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved for the actor (Ray's bookkeeping).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for the actor (fractions share a GPU).")
    threads: int | None = Field(
        None, ge=1,
        description="torch threads in the actor (None: max(1, round(num_cpus))). The roles take "
        "turns (rollout, then scoring, then training), so on a CPU each may use every core.",
    )


class TrainedRoleResources(RoleResources):
    """A trained PPO role (policy, value): `num_workers` actors, one torch.distributed group."""

    num_workers: int = Field(
        1, ge=1, description="Ray actors that train this role together, one bundle each, joined "
        "in one torch.distributed group (gloo on CPU, NCCL on GPU); each takes its share of every "
        "batch and mini-batch, and all take the same optimizer steps.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: every worker holds the whole model, gradients are averaged. fsdp: "
        "parameters, gradients and optimizer state are sharded over the workers (FSDP2, one unit "
        "per decoder layer), for models that do not fit one device.",
    )


class FrozenRoleResources(RoleResources):
    """A frozen PPO role (reference, reward model): replicas that split each batch's forward."""

    num_replicas: int = Field(
        1, ge=1, description="Ray actors that split each batch's forward pass (data parallel).",
    )
    strategy: Literal["replicate", "fsdp"] = Field(
        "replicate", description="replicate: every replica holds the whole model. fsdp: the "
        "replicas hold shards and gather each layer for the forward (a model too large for one "
        "device).",
    )


def _role(kind: type[RoleResources], num_cpus: float = 0.25) -> Any:
    return Field(default_factory=lambda: kind(num_cpus=num_cpus),
                 description="Ray resources of this role (per actor).")


class PPOResources(Section):
    """Placement of the PPO roles. All of them go into one placement group, so the job waits for
    the whole set (an autoscaler sees the demand) instead of starting half of it."""

    rollout: RoleResources = Field(
        default_factory=lambda: RoleResources(num_cpus=1.0),
        description="Each vLLM rollout engine (multiplied by tensor_parallel_size on GPUs).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs each rollout engine shards the policy over (GPU only)."
    )
    policy: TrainedRoleResources = _role(TrainedRoleResources, 0.5)
    value: TrainedRoleResources = _role(TrainedRoleResources)
    reference: FrozenRoleResources = _role(FrozenRoleResources, 0.125)
    reward: FrozenRoleResources = _role(FrozenRoleResources, 0.125)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK"] = Field(
        "PACK", description="Ray placement-group strategy for the roles' bundles."
    )
    placement_timeout_s: float = Field(
        300.0, gt=0, description="Give up (with what was asked and what the cluster has) after this."
    )

    @model_validator(mode="after")
    def _engines_pick_their_threads(self) -> PPOResources:
        if self.rollout.threads is not None:
            raise ValueError("rollout.threads: vLLM binds its own CPU threads (set "
                             "VLLM_CPU_OMP_THREADS_BIND in the environment to change that)")
        return self


class PPOConfig(_NoFraction):
    """PPO against the reward model (defaults close to OpenRLHF's)."""

    steps: int = Field(20, ge=1, description="Rollout + update rounds.")
    prompts_per_step: int = Field(32, ge=1, description="Prompts rolled out each step.")
    samples_per_prompt: int = Field(
        1, ge=1, description="Completions per prompt (the group size for GRPO/RLOO)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest response generated.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature of rollouts; every logprob the trainer "
        "computes (policy, old, reference) is of the same tempered distribution (logits / T).",
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling of rollouts: must stay 1 for PPO (the "
        "trainer's logprobs are of the whole distribution).",
    )
    estimator: Literal["gae", "grpo", "rloo"] = Field(
        "gae", description="Advantage estimator: GAE with a value model, or a critic-free group baseline."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    mini_batch_size: int = Field(16, ge=1, description="Sequences per PPO update.")
    clip_ratio: float = Field(0.2, gt=0, description="PPO policy ratio clip.")
    clip_ratio_c: float | None = Field(
        3.0, gt=1, description="Dual clip: where the advantage is negative, a token's loss is at "
        "most clip_ratio_c * |A| however far its ratio ran (None: off).",
    )
    tis_cap: float | None = Field(
        2.0, ge=1, description="Truncated importance sampling: with old_logprobs 'policy', each "
        "token's loss is weighted by min(pi_trainer / pi_rollout, tis_cap), correcting the "
        "rollout engine's numerics (None: off).",
    )
    grad_clip: float = Field(1.0, gt=0, description="Clip the policy's and value's gradient norm.")
    max_nonfinite_updates: int = Field(
        3, ge=1, description="A mini-batch whose loss or gradient is not finite is skipped (and "
        "logged); this many in a row stop the run, the checkpoint before them intact.",
    )
    value_clip: float = Field(0.5, gt=0, description="Value-function clip around old values.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.02, ge=0, description="Initial coefficient of the KL penalty.")
    kl_mode: Literal["reward", "loss"] = Field(
        "reward", description="How the KL to the reference enters: as a per-token penalty in the "
        "reward (GAE: per-token rewards; GRPO/RLOO: subtracted after the group baseline), or as "
        "a loss term with gradient (verl's use_kl_loss).",
    )
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimator: k1 or k2 in the reward, k2 or k3 in the loss.",
    )
    kl_target: float | None = Field(
        None, gt=0, description="Adapt kl_coef toward this KL (None: fixed coefficient)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    reward_clip: float = Field(10.0, gt=0, description="Clip rewards to [-x, x].")
    center_scores: bool | None = Field(
        None, description="Subtract the batch's mean score before the clip and the KL penalty, so "
        "the returns sit around 0, where a value model with a new head starts; without it, GAE "
        "with lam < 1 bootstraps from that head's wrong zero and pays long replies for their "
        "length. None: when GAE's value model starts with a new head, i.e. from sft/: against a "
        "reward model with a likelihood weight (whose scores sit far below 0), or a function or "
        "HTTP reward. GRPO/RLOO's group "
        "baselines remove the mean anyway.",
    )
    unfinished_penalty: float = Field(
        0.0, description="Added to the reward of a response cut off at max_new_tokens."
    )
    policy_lr: float = Field(1e-5, gt=0, description="Policy learning rate.")
    value_lr: float = Field(1e-5, gt=0, description="Value model learning rate.")
    reward_source: Literal["model", "function", "http"] = Field(
        "model", description="Score rollouts with the reward model, a Python function, or an HTTP scorer."
    )
    reward_function: str | None = Field(
        None, description="'module:function' when reward_source is 'function'."
    )
    reward_url: str | None = Field(None, description="Scorer URL when reward_source is 'http'.")
    num_rollout_engines: int = Field(1, ge=1, description="vLLM engines generating in parallel.")
    kv_cache: KVCacheConfig = _kv_cache("each rollout engine: its share of "
                                        "prompts_per_step x samples_per_prompt (or of the eval prompts)")
    eval_every: int = Field(5, ge=1, description="Evaluate on held-out prompts every N steps.")
    eval_max_prompts: int = Field(
        128, ge=1, description="Evaluate on at most this many held-out prompts (greedy replies)."
    )
    checkpoint_every: int = Field(5, ge=1, description="Save resumable state every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep this many latest PPO checkpoints.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype of the policy/value/reference/reward forward passes "
        "(bf16 autocast over float32 weights; FSDP-sharded roles gather their float32 shards "
        "as bf16 instead); auto as in the training stages.",
    )
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="vLLM's dtype for rollouts. auto: bfloat16 on a GPU, float32 on a CPU "
        "(decided where the engine runs). bf16 logprobs differ more from the trainer's (see "
        "logprob_mismatch in the metrics).",
    )
    old_logprobs: Literal["policy", "rollout"] = Field(
        "policy", description="The ratio's denominator: a forward pass of the policy (exact; "
        "tis_cap then corrects for the engine), or the rollout engine's sampling logprobs. The KL "
        "penalty always uses the trainer's own logprobs, so 'rollout' saves the policy pass only "
        "when the KL is not in the reward (kl_coef 0 or kl_mode loss) and kl_target is unset.",
    )
    rollout_timeout_s: float = Field(
        600.0, gt=0, description="A rollout call that takes longer fails the step instead of hanging."
    )
    engine_restarts: int = Field(
        2, ge=0, description="Rollout engines restarted (and re-synced) after dying, per run."
    )
    role_restarts: int = Field(
        1, ge=0, description="Times per run the roles are recreated from the last checkpoint "
        "after a policy, value, reference or reward worker dies.",
    )
    activation_checkpointing: bool = Field(
        False, description="Policy and value updates keep only each decoder layer's input and "
        "recompute the rest in the backward (about a third more compute; long sequences of "
        "large models need it).",
    )
    weight_sync: Literal["stream", "object_store"] = Field(
        "stream", description="stream: the policy's rank 0 broadcasts its weights to every "
        "engine worker in buckets over a torch.distributed group (gloo on CPU, NCCL on GPU), "
        "falling back to the object store where the group cannot be formed. object_store: one "
        "blob through Ray's object store (slower; for comparison and debugging).",
    )
    sync_bucket_mb: float = Field(
        16.0, gt=0, description="Weight sync sends the policy's parameters to the engines in "
        "buckets of about this size: no process holds more of a gathered sharded model. 16 MB "
        "beat 256 MB by 1.5x on a CPU (bench/RESULTS.md): each received bucket is new memory, "
        "and small ones reuse the allocator's freed pages.",
    )
    resources: PPOResources = Field(default_factory=PPOResources, description="Role placement.")

    @model_validator(mode="after")
    def _batch_shapes(self) -> PPOConfig:
        if self.estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            raise ValueError(f"estimator {self.estimator!r} needs samples_per_prompt >= 2 "
                             f"(a group baseline), got {self.samples_per_prompt}")
        return self

    @model_validator(mode="after")
    def _kl_estimator_fits_its_use(self) -> PPOConfig:
        if self.kl_mode == "reward" and self.kl_estimator == "k3":
            raise ValueError("kl_estimator 'k3' with kl_mode 'reward': as a detached reward its "
                             "gradient nearly cancels near the reference; use k1 or k2 there, or "
                             "kl_mode 'loss' for k3")
        if self.kl_mode == "loss" and self.kl_estimator == "k1":
            raise ValueError("kl_estimator 'k1' with kl_mode 'loss': its gradient is zero in "
                             "expectation; use k2 or k3 as a loss")
        return self

    @model_validator(mode="after")
    def _samples_match_the_trainer(self) -> PPOConfig:
        if self.top_p < 1:
            raise ValueError(f"top_p {self.top_p:g} < 1: nucleus sampling truncates the "
                             "distribution the trainer's logprobs, ratio and KL are computed on; "
                             "keep top_p 1 for PPO (lower the temperature instead)")
        return self

    @model_validator(mode="after")
    def _reward_source_named(self) -> PPOConfig:
        if self.reward_source == "function" and not self.reward_function:
            raise ValueError("reward_source 'function' needs reward_function ('module:function')")
        if self.reward_source == "http" and not self.reward_url:
            raise ValueError("reward_source 'http' needs reward_url")
        return self


class CompareConfig(_NoFraction):
    """Comparisons for the reward model: K samples of the SFT model per prompt, ranked best first
    by a person (the ranking page) or by a labeler function. The rankings are reward data."""

    prompts: list[Path] = Field(
        default_factory=list, description="Prompt files (`prompt`, optional `ground_truth`) to "
        "sample from; empty with data.demo: the demo's compare.jsonl.",
    )
    samples_per_prompt: int = Field(
        4, ge=2, description="K: responses sampled per prompt (a ranking needs at least 2)."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many prompts.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (diverse answers).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(48, ge=1, description="Longest response sampled.")
    labeler: str = Field(
        "human", description="Who ranks: 'human' (the ranking page of `rlhf-ray compare-data`), "
        "'demo' (the demo's simulated labeler, which knows the world's facts) or "
        "'module:function' (a function (prompt, responses) -> one score per response).",
    )
    num_engines: int = Field(1, ge=1, description="vLLM engines (Ray actors) sampling in parallel.")
    engine: RoleResources = Field(
        default_factory=lambda: RoleResources(num_cpus=1.0),
        description="Ray resources of each engine (threads: vLLM picks its own).",
    )
    kv_cache: KVCacheConfig = _kv_cache("each sampling engine: up to 256 sequences at once")
    lease_s: float = Field(
        600.0, gt=0, description="A prompt shown to one person is not shown to another for this "
        "long (so two people never rank the same prompt), unless it comes back unranked.",
    )

    @field_validator("labeler")
    @classmethod
    def _known_labeler(cls, labeler: str) -> str:
        module, sep, function = labeler.partition(":")
        if labeler in ("human", "demo") or (sep and module and function):
            return labeler
        raise ValueError(f"unknown labeler {labeler!r}: use 'human', 'demo' or 'module:function'")

    @model_validator(mode="after")
    def _engines_pick_their_threads(self) -> CompareConfig:
        if self.engine.threads is not None:
            raise ValueError("engine.threads: vLLM binds its own CPU threads")
        return self


class EvalConfig(Section):
    """Where `rlhf-ray eval` runs (one Ray task that loads each stage's model in turn) and who
    judges the replies."""

    resources: RoleResources = Field(
        default_factory=lambda: RoleResources(num_cpus=1.0),
        description="Ray resources of the evaluation task: num_gpus 1 evaluates on a GPU (on a "
        "cluster, a GPU node); threads: torch threads on a CPU (None: num_cpus).",
    )
    labeler: str | None = Field(
        None, description="Who judges each held-out reply of RLHF (and DPO) against SFT's for the "
        "preference win rate: 'demo' (the demo's simulated person) or 'module:function' with "
        "compare.labeler's signature, e.g. a call to a larger model. None: no win rate.",
    )

    @field_validator("labeler")
    @classmethod
    def _a_function(cls, labeler: str | None) -> str | None:
        module, sep, function = (labeler or "").partition(":")
        if labeler is None or labeler == "demo" or (sep and module and function):
            return labeler
        raise ValueError(f"unknown labeler {labeler!r}: use 'demo' or 'module:function' (people "
                         "rank on the ranking page of compare-data, not in the evaluation)")


# --------------------------------------------------------------------------- serving and cluster


ModelName = Literal[MODELS]  # type: ignore[valid-type]  # a served model: rlhf_ray.run.MODELS


class ServeConfig(_NoFraction):
    host: str = Field("127.0.0.1", description="HTTP address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    stages: list[ModelName] = Field(
        default_factory=lambda: list(MODELS),
        description=f"Stage models to serve (those whose folders exist): of {', '.join(MODELS)}.",
    )
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas per stage.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling: most replicas per stage.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Autoscaling: requests per replica to aim for."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Autoscaling: how long the load must stay above the target "
        "before replicas are added (Serve's default; a new replica costs an engine start, and on a "
        "cluster that autoscales maybe a node).",
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Autoscaling: how long the load must stay below the target before "
        "replicas are removed (Serve's default).",
    )
    look_back_period_s: float = Field(
        30.0, gt=10, description="Autoscaling: the window over which ongoing requests are averaged "
        "(longer than the 10 s at which Serve's replicas report their load).",
    )
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests queued before answering 503 (-1: no limit)."
    )
    cpus_per_replica: float = Field(0.5, gt=0, description="CPUs reserved per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica.")
    api_key_env: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` with the key in this variable."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")
    folders: dict[ModelName, Path] = Field(
        default_factory=dict, description="Serve a stage from this folder instead of the run's "
        "own (e.g. {rlhf: runs/other/rlhf}). Deploying again with a changed folder, or after a "
        "stage's folder was rewritten, replaces just that stage's replicas; their in-flight "
        "requests finish first.",
    )
    stream_interval_ms: float = Field(
        50.0, ge=0, description="A streamed reply's tokens travel in batches this far apart (the "
        "first at once): each batch costs two hops through Ray, as much as a small model's token "
        "on a CPU. 0: each batch holds whatever was ready.",
    )
    start_timeout_s: float = Field(
        900.0, gt=0, description="How long deploying waits for every replica to run (e.g. for an "
        "autoscaler to add GPU nodes), saying every 30 s what it waits for, before giving up.",
    )
    drain_timeout_s: float = Field(
        120.0, gt=0, description="How long a replica being replaced or scaled down may finish its "
        "in-flight requests before it is stopped.",
    )
    kv_cache: KVCacheConfig = _kv_cache("each replica: max_ongoing_requests full-context "
                                        "sequences")


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:10001'); None starts a local Ray."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the embedded local Ray (None: all of this machine's)."
    )
    serve_ingress: Literal["proxy", "direct", "haproxy"] = Field(
        "proxy", description="How HTTP reaches the served apps on the embedded local Ray. "
        "'proxy': Serve's HTTP proxy actor, which hands each request to a replica over Ray. "
        "'direct': the same, and every replica of a stage also answers HTTP on a port of its "
        "own (Serve's direct ingress): no process between the client and the one running the "
        "engine, as in `vllm serve`. Serve picks the ports (30000-31000) and changes them when a "
        "replica is replaced; `rlhf-ray serve` prints them and the router's GET /v1/models "
        "lists each model's current `base_urls`. "
        "'haproxy': Serve's HAProxy (shipped with ray[serve] on Linux) in front of those ports. "
        "bench/RESULTS.md has all three measured. A cluster started elsewhere keeps the ingress "
        "its `ray start` environment chose (RAY_SERVE_ENABLE_DIRECT_INGRESS, "
        "RAY_SERVE_ENABLE_HA_PROXY).",
    )


# --------------------------------------------------------------------------- experiment tracking


class MLflowConfig(Section):
    """Where MLflow keeps the run (`pip install 'rlhf-ray[mlflow]'`)."""

    tracking_uri: str = Field(
        ..., description="The MLflow tracking server ('http://mlflow:5000') or store ('file:///...', "
        "'sqlite:///mlflow.db'), as mlflow.set_tracking_uri takes it.",
    )
    experiment: str = Field("rlhf-ray", description="The experiment; created if it does not exist.")
    log_models: bool = Field(
        False, description="Also upload each stage's final Hugging Face folder as the stage run's "
        "artifacts (large for real models).",
    )


class WandbConfig(Section):
    """Where Weights & Biases keeps the run (`pip install 'rlhf-ray[wandb]'`)."""

    project: str = Field("rlhf-ray", description="The W&B project.")
    entity: str | None = Field(None, description="The W&B team or user (None: the default one).")
    mode: Literal["online", "offline"] = Field(
        "online", description="'offline' writes the run under <run>/wandb/ for `wandb sync` later; "
        "'online' needs WANDB_API_KEY (or `wandb login`).",
    )


class TrackingConfig(Section):
    """Where each stage's metrics go besides metrics/<stage>.jsonl, under the same names. The
    driver forwards each row as the stage writes it; a tracker that fails is warned about once
    and left off, and the training goes on (the JSONL stays complete)."""

    tensorboard: bool = Field(
        True, description="TensorBoard event files under <run>/tensorboard/<stage>/ "
        "(`tensorboard --logdir runs/<name>/tensorboard`).",
    )
    mlflow: MLflowConfig | None = Field(
        None, description="An MLflow run named after the run folder (the config as its params), "
        "one child run per stage with its metrics. null: no MLflow.",
    )
    wandb: WandbConfig | None = Field(
        None, description="One W&B run per stage, grouped by the run folder's name, the config "
        "as its config. null: no W&B.",
    )


# --------------------------------------------------------------------------- the run


class RunConfig(Section):
    """Everything one run needs. Its outputs go to <runs_dir>/<name>/."""

    name: str = Field(
        "demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Run name: the output folder's name."
    )
    runs_dir: Path = Field(Path("runs"), description="Parent folder of all runs (local or shared).")
    seed: int = Field(0, description="Seed for model init, data order and sampling.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where Ray runs.")
    data: DataConfig = Field(default_factory=DataConfig, description="Record files per stage.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Stage 0.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy architecture.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Stage 1.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Stage 2.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Stage 3a.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="Stage 3b.")
    dpo: DPOConfig | None = Field(
        None, description="DPO from sft/ on the comparisons (`rlhf-ray dpo`, run by the pipeline "
        "after PPO): the alternative to reward model + PPO, output dpo/. null: not run.",
    )
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig, description="The evaluation across stages (rlhf-ray eval)."
    )
    compare: CompareConfig | None = Field(
        None, description="Collect ranked SFT samples as reward data (`rlhf-ray compare-data`, "
        "run by the pipeline between SFT and the reward model). null: data.reward only.",
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve endpoints.")
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="TensorBoard, MLflow, W&B: where metrics go "
        "besides the JSONL files.",
    )

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    @model_validator(mode="after")
    def _absolute_paths(self) -> RunConfig:
        """Relative paths are relative to where the command runs; Ray workers run elsewhere."""
        self.runs_dir = _absolute(self.runs_dir)
        for kind in DataConfig.model_fields:
            if kind != "demo":
                setattr(self.data, kind, [_absolute(p) for p in getattr(self.data, kind)])
        if self.model.pretrained:
            self.model.pretrained = _absolute(self.model.pretrained)
        if self.tokenizer.pretrained:
            self.tokenizer.pretrained = _absolute(self.tokenizer.pretrained)
        if self.compare is not None:
            self.compare.prompts = [_absolute(p) for p in self.compare.prompts]
        return self

    @model_validator(mode="after")
    def _pretrained_pairs(self) -> RunConfig:
        if self.model.pretrained and not self.tokenizer.pretrained:
            self.tokenizer.pretrained = self.model.pretrained
        if self.pretrain.seq_len > self.model.max_seq_len and not self.model.pretrained:
            raise ValueError(
                f"pretrain.seq_len ({self.pretrain.seq_len}) exceeds model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        return self


def _absolute(path: Path) -> Path:
    return path.expanduser().absolute()


# --------------------------------------------------------------------------- YAML in and out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config; `overrides` are 'dotted.key=value' strings (value parsed as YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {e.start}") from None
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping of sections, got {type(raw).__name__}")
    lines = _line_numbers(node)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected 'dotted.key=value'")
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(value))
        lines[tuple(key.strip().split("."))] = f"override {item!r}"
    return validate_config(raw, source=str(path), lines=lines)


def validate_config(
    raw: dict[str, Any], source: str = "<config>", lines: dict[tuple[str, ...], Any] | None = None
) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, source, lines or {})) from None


def save_config(config: RunConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _describe(error: ValidationError, source: str, lines: dict[tuple[str, ...], Any]) -> str:
    out = [f"{source}: {error.error_count()} invalid setting(s)"]
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        field = ".".join(loc) or "(top level)"
        where = _nearest_line(lines, loc)
        prefix = f"{source}:{where}" if isinstance(where, int) else (where or source)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling; see the README's config reference)"
        got = f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else ""
        out.append(f"  {prefix}: {field}: {message}{got}")
    return "\n".join(out)


def _nearest_line(lines: dict[tuple[str, ...], Any], loc: tuple[str, ...]) -> Any:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _line_numbers(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Map each dotted key path of a YAML document to its 1-based line."""
    found: dict[tuple[str, ...], Any] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            found[path] = key.start_mark.line + 1
            found.update(_line_numbers(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = prefix + (str(i),)
            found[path] = value.start_mark.line + 1
            found.update(_line_numbers(value, path))
    return found


def _set_dotted(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        child = raw.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override: {'.'.join(keys)}: {key} is not a section")
        raw = child
    raw[keys[-1]] = value
