"""A paper check of a run: each role's memory per device, its placement, and the GPUs in all.

Nothing is loaded or started; the numbers follow from the config and from what the code does:
- Trainers (Ray Train workers, PPO policy and value workers) keep float32 weights, so there is
  no separate master copy: weights 4 B + gradients 4 B + AdamW's two float32 moments 8 B =
  16 B/param, divided over the workers by FSDP, not by DDP. Under bf16 the Ray Train workers
  (train/loop.py), and PPO roles that are not sharded (ddp, replicate, or fsdp on one actor), run
  under autocast, which saves a bf16 copy of every weight for the backward (2 B/param, FSDP or
  not: the cast of each gathered layer is what autograd keeps), counted under activations.
- PPO roles sharded by fsdp (rl/roles.py `_Worker.join`: more than one actor) use FSDP2's mixed
  precision instead of autocast: each unit (a decoder layer; the root: embeddings, final norm,
  lm_head or score) is gathered in the compute dtype (bf16 2 B, else 4 B per param) and freed
  after use, so only the largest unit is counted, gathered, under activations; a trained role
  adds its float32 gradient before the reduce-scatter (4 B per param of that unit).
- PPO roles are groups: num_workers policy/value workers, num_replicas reference/reward replicas,
  one bundle each; every actor takes its share (rounded up) of each batch and mini-batch. The
  frozen roles' float32 weights are whole in each replica (replicate) or divided over them (fsdp).
  The policy's rank 0 also holds one weight-sync bucket (ppo.sync_bucket_mb), counted under
  activations.
- Activations per token, as autograd saves them (measured on transformers' Llama with SDPA, so no
  seq^2 term): per layer 24h + b(3h + 2kv*d + 4i), b = 2 under bf16 (autocast or FSDP's bf16
  gather), 4 in float32; logits (b + 8)V for the LM loss, (b + 16)V for PPO's logprobs + entropy.
  With ppo.activation_checkpointing the policy and value updates keep only each layer's input
  (bh per layer) and recompute one layer at a time in the backward (its full per-layer bytes),
  plus the logits; the training stages have no checkpointing. A forward pass without gradients:
  8h + 3bi per token, plus its logits.
- precision "auto" is bf16 on a GPU and taken as float32 on a CPU. The reference and reward actors
  load float32 weights; vLLM runs bf16 on a GPU, float32 on a CPU.
- Sequences: pretrain.seq_len; SFT and reward model.max_seq_len (2 per comparison); PPO prompt +
  max_new_tokens, the prompt at most context - max_new_tokens unless `prompt_tokens` says.
GB is 1e9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from rlhf_ray.config import (
    KVCacheConfig,
    PPOConfig,
    RoleResources,
    RunConfig,
    TrainedRoleResources,
    TrainStage,
)
from rlhf_ray.memory import (
    GB,
    ModelShape,
    count_params,
    ENGINE_PROCESS_BYTES,
    MAX_ENGINE_SEQUENCES,
    ROLE_PROCESS_BYTES,
    check_machine_fits,
    engine_sequences,
    kv_bytes_per_token,
    kv_cache_bytes,
    rollout_sequences,
    shape_from_folder,
)
from rlhf_ray.run import CHAT_MODELS, REWARD_MODEL
from rlhf_ray.run import stage as stage_named
from rlhf_ray.tokenizer import load_tokenizer

TRAINED_ROLES = ("policy", "value")  # PPO's worker groups; reference and reward are replicas
MOST_ACTORS = 1024  # the largest worker group or replica set a hint looks for
DPO = stage_named("dpo").folder  # served only when the config trains it


class PlanError(ValueError):
    """The plan cannot be made; the message names the setting or file at fault."""


@dataclass
class RoleMemory:
    """One role's bytes per device: per GPU when `budget` is set, else host memory (unchecked)."""

    role: str
    placement: str
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    budget: float | None = None  # what this role may use of each GPU
    fits: bool | None = None
    note: str = ""  # the smallest change that makes it fit, or a caveat
    count: int = 1  # how many of these actors the stage starts
    engine: bool = False  # a vLLM engine (its own processes), else a torch role

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache


@dataclass
class StagePlan:
    name: str
    roles: list[RoleMemory]
    gpus: int
    cpus: float
    seq_len: int  # tokens per sequence assumed
    strategy: str = ""  # of the Ray placement group its bundles go in


@dataclass
class Plan:
    shape: ModelShape
    params: int
    gpu_memory_gb: float
    stages: list[StagePlan]
    training_gpus: int  # stages run one after another: the cluster needs the largest
    serve_gpus: int


# --------------------------------------------------------------------------- the model


def model_shape(cfg: RunConfig) -> ModelShape:
    """The policy's architecture: model.pretrained's config.json, else the model.* fields."""
    m, tokenizer = cfg.model, cfg.tokenizer.pretrained
    if m.pretrained is not None:
        return _shape_from_folder(Path(m.pretrained))
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise PlanError(f"tokenizer.pretrained: {tokenizer} not found; its size sets the vocabulary")
    # modeling.llama_config takes the tokenizer's size; a trained BPE's is tokenizer.vocab_size
    # (or less, if the corpus runs out of merges)
    vocab = load_tokenizer(Path(tokenizer)).vocab_size if tokenizer else cfg.tokenizer.vocab_size
    return ModelShape(m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads,
                      m.hidden_size // m.num_heads, m.intermediate_size, vocab, m.max_seq_len,
                      m.tie_word_embeddings)


def _shape_from_folder(folder: Path) -> ModelShape:
    if not folder.is_dir():
        raise PlanError(f"model.pretrained: {folder} not found on this machine; plan with explicit "
                        "sizes: --set model.pretrained=null model.hidden_size=... tokenizer.vocab_size=...")
    try:
        return shape_from_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise PlanError(f"model.pretrained: {e}") from None


def activation_bytes(s: ModelShape, tokens: int, bf16: bool, logits: int | None,
                     checkpointed: bool = False) -> int:
    """Saved for the backward by `tokens` tokens; `logits`: float32 bytes per vocab entry beyond
    the logits themselves (8 for the LM loss, 16 for PPO's), None for a scalar head.
    `checkpointed`: each layer keeps its input only, and one layer is recomputed at a time."""
    b = 2 if bf16 else 4
    per_layer = 24 * s.hidden + b * (3 * s.hidden + 2 * s.kv_heads * s.head_dim + 4 * s.intermediate)
    layers = s.layers * b * s.hidden + per_layer if checkpointed else s.layers * per_layer
    return tokens * (layers + (0 if logits is None else (b + logits) * s.vocab))


def forward_bytes(s: ModelShape, tokens: int, bf16: bool, lm: bool) -> int:
    """A forward pass without gradients: about one layer alive, plus logprobs and entropy."""
    b = 2 if bf16 else 4
    return tokens * (8 * s.hidden + 3 * b * s.intermediate + ((b + 16) * s.vocab if lm else 0))


# --------------------------------------------------------------------------- roles and stages


def _bundle(cpus: float, gpus: float, bf16: bool | None = None) -> str:
    dtype = "" if bf16 is None else " bf16" if bf16 else " fp32"
    return f"{{CPU: {cpus:g}" + (f", GPU: {gpus:g}}}" if gpus else "}") + dtype


def _bf16(precision: str, on_gpu: bool) -> bool:
    return precision == "bfloat16" or (precision == "auto" and on_gpu)


def _trainer(role: str, placement: str, params: int, act: float, budget: float | None,
             shards: int = 1, count: int = 1) -> RoleMemory:
    """`act`: everything under activations, autocast's copies or FSDP's gathered unit included."""
    return RoleMemory(role, placement, 4 * params / shards, 4 * params / shards, 8 * params / shards,
                      act, budget=budget, count=count)


def _copies(params: int, bf16: bool) -> int:
    """Autocast's bf16 weights, saved for the backward: whole on every worker, FSDP or not."""
    return 2 * params if bf16 else 0


def _copies_exceed(copies: float) -> str:
    return f"autocast's bf16 copy of all weights ({copies / GB:.0f} GB) alone exceeds the GPU, FSDP or not"


def _check(r: RoleMemory, fix: str) -> RoleMemory:
    if r.budget is not None:
        r.fits = r.total <= r.budget
        r.note = "" if r.fits else fix
    return r


def train_stage(name: str, st: TrainStage, s: ModelShape, params: int, seq: int, gpu: float,
                per_item: int = 1, logits: int | None = 8) -> StagePlan:
    """pretrain/sft/reward: Ray Train workers, one GPU each with use_gpu (ray_stage.py)."""
    res = st.resources
    shards = res.num_workers if st.strategy == "fsdp" else 1  # loop.py: fsdp only with >1 worker
    bf16 = _bf16(st.precision, res.use_gpu)
    act = activation_bytes(s, st.micro_batch_size * per_item * seq, bf16, logits)
    placement = f"{res.num_workers} x {_bundle(res.cpus_per_worker, res.use_gpu, bf16)} {st.strategy}"
    copies = _copies(params, bf16)
    r = _trainer("worker", placement, params, act + copies, gpu if res.use_gpu else None, shards)
    most = int((gpu - copies) // (act / st.micro_batch_size))  # sequences per micro-batch that fit
    if r.activations < gpu:
        fix = (f"needs strategy fsdp over >= {math.ceil(16 * params / (gpu - r.activations))} GPUs "
               f"({name}.resources.num_workers)")
    elif copies >= gpu:  # loop.py shards float32 weights; autocast's bf16 copies are whole
        fix = _copies_exceed(copies)
    elif most > 0:
        fix = f"activations exceed the GPU: {name}.micro_batch_size <= {most}, then re-plan"
    else:
        fix = "one sequence's activations exceed the GPU (no activation checkpointing): shorten it"
    gpus, cpus = res.num_workers * res.use_gpu, res.num_workers * res.cpus_per_worker
    return StagePlan(name, [_check(r, fix)], gpus, cpus, seq, getattr(res, "placement_strategy", "PACK"))


def ppo_stage(cfg: RunConfig, s: ModelShape, gpu: float, prompt_tokens: int | None) -> StagePlan:
    """rl/ppo.py's roles in one placement group (rl/actors.py reserve): one bundle per rollout
    engine (tensor_parallel_size GPUs), per policy/value worker and per reference/reward replica."""
    ppo, res = cfg.ppo, cfg.ppo.resources
    prompt = s.max_seq_len - ppo.max_new_tokens if prompt_tokens is None else prompt_tokens
    seq = prompt + ppo.max_new_tokens
    tp, engines, rollout = res.tensor_parallel_size, ppo.num_rollout_engines, res.rollout
    dtype = 2 if ppo.rollout_dtype == "bfloat16" or (ppo.rollout_dtype == "auto" and rollout.num_gpus) else 4
    roles = [_vllm("rollout", f"{engines} x {_bundle(rollout.num_cpus, rollout.num_gpus * tp)} tp {tp}",
                   rollout.num_gpus, s, count_params(s), dtype, rollout_sequences(ppo), seq, gpu,
                   ppo.kv_cache, "ppo", "ppo.prompts_per_step / eval_max_prompts", tp, engines)]
    names = (["policy", "reference"] + ["value"] * (ppo.estimator == "gae")
             + ["reward"] * (ppo.reward_source == "model"))
    for name in names:
        r = getattr(res, name)
        m = _check(_ppo_role(ppo, name, s, seq, gpu, _actors(r), r.strategy), "")
        if m.fits is False:
            m.note = _ppo_fix(ppo, name, s, seq, gpu, m)
        roles.append(m)
    bundles = [rollout.num_gpus * tp] * engines + [
        getattr(res, m.role).num_gpus for m in roles[1:] for _ in range(m.count)]
    cpus = rollout.num_cpus * engines + sum(getattr(res, m.role).num_cpus * m.count for m in roles[1:])
    return StagePlan("ppo", roles, gpus_for(bundles), cpus, seq, res.placement_strategy)


def _actors(r: RoleResources) -> int:
    return r.num_workers if isinstance(r, TrainedRoleResources) else r.num_replicas


def _role_params(s: ModelShape, name: str) -> int:
    return count_params(s, scalar_head=name in ("value", "reward"))


def _largest_unit(s: ModelShape, name: str) -> int:
    """The parameters of role `name`'s largest FSDP unit (rl/roles.py `_Worker.join`): a decoder
    layer, or the root (embeddings, final norm, lm_head or score)."""
    root = count_params(replace(s, layers=0), scalar_head=name in ("value", "reward"))
    return max(root, (_role_params(s, name) - root) // s.layers)


def _transient_weights(ppo: PPOConfig, s: ModelShape, name: str, n: int, strategy: str, bf16: bool
                       ) -> int:
    """What a PPO actor holds of its weights beyond its float32 share, counted under activations.
    Sharded (fsdp, n > 1): FSDP's mixed precision gathers one unit at a time in the compute
    dtype, and a trained role's backward adds that unit's float32 gradient. Else bf16 autocast's
    copy of all weights, saved for a trained role's backward (a frozen role's casts are freed)."""
    trained = name in TRAINED_ROLES
    if strategy == "fsdp" and n > 1:
        return ((2 if bf16 else 4) + 4 * trained) * _largest_unit(s, name)
    return _copies(_role_params(s, name), bf16) if trained else 0


def _ppo_role(ppo: PPOConfig, name: str, s: ModelShape, seq: int, gpu: float, n: int, strategy: str
              ) -> RoleMemory:
    """Each of the `n` actors of PPO role `name` (rl/roles.py) under `strategy`."""
    r = getattr(ppo.resources, name)
    lm, params = name in ("policy", "reference"), _role_params(s, name)
    bf16, budget = _bf16(ppo.precision, bool(r.num_gpus)), gpu * min(r.num_gpus, 1) or None
    placement = f"{n} x {_bundle(r.num_cpus, r.num_gpus, bf16)} {strategy}"
    shards = n if strategy == "fsdp" else 1
    batch = math.ceil(ppo.prompts_per_step * ppo.samples_per_prompt / n)  # scored at once
    scoring = forward_bytes(s, batch * seq, bf16, lm)
    transient = _transient_weights(ppo, s, name, n, strategy, bf16)
    if name not in TRAINED_ROLES:
        return RoleMemory(name, placement, 4 * params / shards, activations=scoring + transient,
                          budget=budget, count=n)
    if name == "policy" and ppo.old_logprobs == "rollout":
        scoring = 0  # the policy's own logprobs pass is skipped
    update = activation_bytes(s, math.ceil(ppo.mini_batch_size / n) * seq, bf16, 16 if lm else None,
                              ppo.activation_checkpointing)
    # rank 0's weight-sync bucket, added although it lives between updates, not beside their activations
    bucket = min(ppo.sync_bucket_mb * 1e6, 4 * params) if name == "policy" else 0
    return _trainer(name, placement, params, max(update, scoring) + transient + bucket, budget, shards, n)


def _ppo_fix(ppo: PPOConfig, name: str, s: ModelShape, seq: int, gpu: float, m: RoleMemory) -> str:
    """The smallest change that fits PPO role `name`, whose actor `m` exceeds its budget: a whole
    GPU, more actors of its strategy, or fsdp over more of them."""
    r = getattr(ppo.resources, name)
    if r.num_gpus < 1 and m.total <= gpu:
        return "give it a whole GPU (num_gpus: 1)"
    assert m.budget is not None
    key, unit = ("num_workers", "workers") if name in TRAINED_ROLES else ("num_replicas", "replicas")
    n = _fewest(ppo, name, s, seq, gpu, r.strategy, m.budget)
    if n is not None:
        return f"needs strategy {r.strategy} over >= {n} {unit} (ppo.resources.{name}.{key})"
    n = _fewest(ppo, name, s, seq, gpu, "fsdp", m.budget)  # no autocast copy of the weights
    if n is not None:
        return f"needs strategy fsdp over >= {n} {unit} (ppo.resources.{name}.{key})"
    if name in TRAINED_ROLES and not ppo.activation_checkpointing:
        n = _fewest(ppo.model_copy(update={"activation_checkpointing": True}), name, s, seq, gpu,
                    "fsdp", m.budget)
        if n is not None:
            return (f"needs ppo.activation_checkpointing: true and strategy fsdp over >= {n} "
                    f"{unit} (ppo.resources.{name}.{key})")
    return ("one sequence exceeds the GPU at any number of actors: shorten it "
            "(ppo.max_new_tokens, the prompts)")


def _fewest(ppo: PPOConfig, name: str, s: ModelShape, seq: int, gpu: float, strategy: str,
            budget: float) -> int | None:
    """The fewest actors of `strategy` whose actor fits `budget`, if any does."""
    return next((n for n in range(1, MOST_ACTORS + 1)
                 if _ppo_role(ppo, name, s, seq, gpu, n, strategy).total <= budget), None)


def _vllm(role: str, placement: str, gpus: float, s: ModelShape, params: int, dtype: int, seqs: int,
          seq: int, gpu: float, kv: KVCacheConfig, section: str, knob: str, tp: int | None = None,
          count: int = 1) -> RoleMemory:
    """A vLLM engine (on `gpus` GPUs each, 0 on a CPU): its 1/tp of the weights and of the KV
    cache it asks for (memory.kv_cache_bytes: `seqs` sequences of `seq` tokens at once, at most
    vLLM's batch). With kv.memory_fraction the engine takes that share of the GPU instead."""
    n = tp if gpus and tp else 1
    at_once = engine_sequences(seqs)
    weights, seq_kv = params * dtype, kv_bytes_per_token(s, dtype) * seq
    fraction = kv.memory_fraction
    cache = seq_kv * at_once if fraction is not None else kv_cache_bytes(s, dtype, at_once, seq, kv)
    r = RoleMemory(role, placement, weights / n, kv_cache=cache / n, count=count, engine=True)
    if not gpus:
        return r
    r.budget = gpu * (fraction if fraction is not None else min(gpus, 1))
    r.fits = (weights + seq_kv) / n <= r.budget
    if r.total <= r.budget:
        return r
    want = weights + (cache if r.fits else seq_kv)  # every sequence at once, or the first
    tp_min = math.ceil(want / r.budget)  # rounded up to a divisor of the heads, as vLLM needs
    tp_min = next((t for t in range(tp_min, s.heads + 1) if s.heads % t == 0), tp_min)
    fixes = [f"{section}.resources.tensor_parallel_size >= {tp_min}"] * (tp is not None)
    if fraction is not None:
        needed = math.ceil(100 * want / n / gpu) / 100  # of the GPU
        fixes = [f"{section}.kv_cache.memory_fraction >= {needed:g}"] * (needed <= 0.95) + fixes
    elif r.fits:
        fixes = [f"lower {knob}", f"{section}.kv_cache.tokens <= "
                 f"{int((r.budget - r.weights) * n // kv_bytes_per_token(s, dtype))}"] + fixes
    if r.fits:
        room = int((r.budget - r.weights) // (seq_kv / n))
        r.fits = fraction is not None  # an explicit cache larger than the GPU does not start
        r.note = f"KV cache holds ~{room} of {at_once} sequences at once: "
    else:
        r.note = f"weights + one {seq}-token sequence exceed {r.budget / GB:.1f} GB: "
    r.note += " or ".join(fixes) or f"no {gpu / GB:g} GB GPU holds it (no tensor parallelism)"
    return r


def serve_stage(cfg: RunConfig, s: ModelShape, gpu: float) -> StagePlan:
    """serve/app.py build_stage_app: up to max_replicas vLLM replicas per chat stage (no tensor
    parallelism), and one reward-model replica in float32 on its CPU."""
    sv = cfg.serve
    base = CHAT_MODELS[0]  # a pretrained run has no base/ of its own
    chat = [st for st in sv.stages if st in CHAT_MODELS
            and not (st == base and cfg.model.pretrained and base not in sv.folders)
            and not (st == DPO and cfg.dpo is None and DPO not in sv.folders)]
    on_gpu, replicas = bool(sv.gpus_per_replica), len(chat) * sv.max_replicas
    bundle = f"{replicas} x {_bundle(sv.cpus_per_replica, sv.gpus_per_replica)}"
    roles = [_vllm(f"{'/'.join(chat)} replica", bundle, sv.gpus_per_replica, s, count_params(s),
                   2 if on_gpu else 4, sv.max_ongoing_requests, s.max_seq_len, gpu, sv.kv_cache, "serve",
                   "serve.max_ongoing_requests", count=replicas)
             ] if chat else []
    if REWARD_MODEL in sv.stages:
        roles.append(RoleMemory("reward replica", f"1 x {_bundle(sv.cpus_per_replica, 0)}",
                                4 * count_params(s, scalar_head=True)))
    cpus = sv.cpus_per_replica * (replicas + (REWARD_MODEL in sv.stages))
    return StagePlan("serve", roles, gpus_for([sv.gpus_per_replica] * replicas), cpus, s.max_seq_len)


def compare_stage(cfg: RunConfig, s: ModelShape, gpu: float, prompt_tokens: int | None) -> StagePlan:
    """compare/collect.py: `num_engines` vLLM engines sampling from sft/ (float32 on a CPU),
    each sequence the longest prompt (default: what the context leaves) + max_new_tokens."""
    c = cfg.compare
    assert c is not None
    seq = s.max_seq_len if prompt_tokens is None else prompt_tokens + c.max_new_tokens
    res, on_gpu = c.engine, bool(c.engine.num_gpus)
    prompts = c.max_prompts or MAX_ENGINE_SEQUENCES  # the prompt files are not read here
    engine = _vllm("sampling engine", f"{c.num_engines} x {_bundle(res.num_cpus, res.num_gpus)}",
                   res.num_gpus, s, count_params(s), 2 if on_gpu else 4,
                   math.ceil(prompts * c.samples_per_prompt / c.num_engines), seq, gpu, c.kv_cache,
                   "compare", "compare.num_engines", count=c.num_engines)
    return StagePlan("compare", [engine], gpus_for([res.num_gpus] * c.num_engines),
                     res.num_cpus * c.num_engines, seq)


def gpus_for(bundles: list[float]) -> int:
    """GPUs for Ray bundles: whole ones as asked, fractions packed first-fit decreasing."""
    free: list[float] = []  # what is left of each GPU holding fractions
    for b in sorted((b for b in bundles if 0 < b < 1), reverse=True):
        i = next((i for i, f in enumerate(free) if f >= b - 1e-9), None)
        if i is None:
            free.append(1.0 - b)
        else:
            free[i] -= b
    return sum(math.ceil(b) for b in bundles if b >= 1) + len(free)


def plan_run(cfg: RunConfig, gpu_memory_gb: float = 80.0, prompt_tokens: int | None = None) -> Plan:
    """Every stage of `cfg`: its roles' memory per device, placement and GPUs.
    `prompt_tokens`: the longest RL prompt (default: the most the context leaves)."""
    if not gpu_memory_gb > 0:
        raise PlanError(f"gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    if prompt_tokens is not None and prompt_tokens < 1:
        raise PlanError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    s, gpu = model_shape(cfg), gpu_memory_gb * GB
    lm, scalar = count_params(s), count_params(s, scalar_head=True)
    stages = [] if cfg.model.pretrained else [  # pipeline.py: a pretrained model skips pretraining
        train_stage("pretrain", cfg.pretrain, s, lm, cfg.pretrain.seq_len, gpu)]
    stages += [train_stage("sft", cfg.sft, s, lm, cfg.model.max_seq_len, gpu),
               train_stage("reward", cfg.reward, s, scalar, cfg.model.max_seq_len, gpu, 2, None),
               ppo_stage(cfg, s, gpu, prompt_tokens)]
    if cfg.compare is not None:  # pipeline.py: between SFT and the reward model
        stages.insert(-2, compare_stage(cfg, s, gpu, prompt_tokens))
    if cfg.dpo is not None:  # two responses a comparison, like the reward model; the reference
        # (sft/) is loaded only before the first step, to compute its log-probabilities once
        stages.append(train_stage("dpo", cfg.dpo, s, lm, cfg.model.max_seq_len, gpu, 2))
    serve = serve_stage(cfg, s, gpu)
    return Plan(s, lm, gpu_memory_gb, stages + [serve], max(st.gpus for st in stages), serve.gpus)


def check_fits_here(cfg: RunConfig, stage: str, model_dir: Path, prompt_tokens: int | None = None
                    ) -> None:
    """Before `stage` ('ppo', 'compare' or 'serve') starts its engines and roles on this machine
    (the embedded local Ray): each role's host memory in the plan, with its processes, against
    what the machine has. Roles on GPUs are left to the GPU budget the plan checks.
    `prompt_tokens`: the stage's longest prompt, when it has read them."""
    s = shape_from_folder(model_dir)
    plans = {"ppo": lambda: ppo_stage(cfg, s, 80 * GB, prompt_tokens),
             "compare": lambda: compare_stage(cfg, s, 80 * GB, prompt_tokens),
             "serve": lambda: serve_stage(cfg, s, 80 * GB)}
    needs: dict[str, float] = {}
    kv: dict[str, int] = {}
    for r in plans[stage]().roles:
        if r.budget is not None:
            continue
        name = f"{r.count} x {r.role}" if r.count > 1 else r.role
        process = ENGINE_PROCESS_BYTES if r.engine else ROLE_PROCESS_BYTES
        needs[name] = r.count * (r.total + process)
        if r.engine:
            kv[name] = int(r.count * r.kv_cache)
    check_machine_fits(f"the {stage} stage", needs, kv)


# --------------------------------------------------------------------------- the report


def _size(n: float | None) -> str:
    return "-" if not n else f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def format_plan(plan: Plan) -> str:
    """The plan as plain-text tables, one per stage, and the GPU count."""
    s, p = plan.shape, plan.params
    out = [f"model: {f'{p / 1e9:.2f}B' if p >= 1e9 else f'{p / 1e6:.1f}M'} parameters ({s.layers} layers, "
           f"hidden {s.hidden}, {s.heads} heads, {s.kv_heads} kv heads of {s.head_dim}, "
           f"MLP {s.intermediate}, vocab {s.vocab}, context {s.max_seq_len}"
           f"{', tied embeddings' if s.tied else ''}); "
           f"{plan.gpu_memory_gb:g} GB GPUs"]
    header = ("role", "placement", "weights", "grads", "optimizer", "activations", "KV cache",
              "total/device", "budget", "fits?")
    for st in plan.stages:
        rows = [header] + [
            (r.role, r.placement,
             *map(_size, (r.weights, r.grads, r.optimizer, r.activations, r.kv_cache, r.total)),
             _size(r.budget) if r.budget else "host", {True: "yes", False: "NO", None: "cpu"}[r.fits])
            for r in st.roles]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        where = f" in one {st.strategy} placement group" if st.strategy else ""
        out += ["", f"{st.name}: {st.gpus} GPU(s), {st.cpus:g} CPUs{where}, sequences of {st.seq_len} tokens"]
        for row in rows:  # names left-aligned, numbers right-aligned
            out.append("  " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(row, widths))))
        out += [f"  - {r.role}: {r.note}" for r in st.roles if r.note]
    out += ["", f"GPUs: {plan.training_gpus} to train (the largest stage; stages run one after another), "
                f"{plan.serve_gpus} to serve (at serve.max_replicas)"]
    return "\n".join(out)
