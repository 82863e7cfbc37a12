"""The resource planner: parameter counts, per-role memory, placement and GPU counts, on paper."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaForSequenceClassification, Qwen2Config, Qwen2ForCausalLM

from rlhf_ray.config import PPOConfig, load_config
from rlhf_ray.modeling import count_parameters, llama_config, load_policy, load_scalar_model, new_policy
from rlhf_ray.plan import (
    GB,
    ModelShape,
    PlanError,
    activation_bytes,
    count_params,
    format_plan,
    forward_bytes,
    gpus_for,
    kv_bytes_per_token,
    model_shape,
    plan_run,
)
from tests.tiny import TINY_MODEL

CONFIGS = Path(__file__).parents[2] / "configs"
PLAN_7B, PLAN_70B = CONFIGS / "plan-llama2-7b.yaml", CONFIGS / "plan-llama2-70b.yaml"
P7B, P70B = 6_738_415_616, 68_976_648_192  # Llama-2's parameters (test_the_published_llama_2_counts)
# FSDP's largest unit: 7B's root (embeddings + lm_head 2 x 32000 x 4096, final norm 4096), 70B's
# decoder layer (q, o 8192^2 each; k, v 8192 x 1024 each; MLP 3 x 8192 x 28672; two norms)
UNIT_7B = 2 * 32000 * 4096 + 4096
UNIT_70B = 2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
BUCKET = PPOConfig().sync_bucket_mb * 1e6  # the policy's rank 0 holds one weight-sync bucket
# configs/test.yaml's model: hidden 64, 2 layers, 2 heads of 32, 1 kv head, MLP 128, vocab 512,
# context 512, tied embeddings.
TINY_PARAMS = (
    512 * 64  # embedding (tied: also the lm_head)
    + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64  # q, k and v (one kv head of 32), o
           + 3 * 64 * 128  # gate, up, down
           + 2 * 64)  # two RMSNorms
    + 64  # the final norm
)
LLAMA2_7B = [
    "model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32", "model.num_kv_heads=32",
    "model.intermediate_size=11008", "model.tie_word_embeddings=false", "tokenizer.vocab_size=32000",
    "model.max_seq_len=4096", "pretrain.seq_len=4096",
]
LLAMA2_70B = [
    "model.hidden_size=8192", "model.num_layers=80", "model.num_heads=64", "model.num_kv_heads=8",
    "model.intermediate_size=28672", "model.tie_word_embeddings=false", "tokenizer.vocab_size=32000",
    "model.max_seq_len=4096", "pretrain.seq_len=4096",
]
ON_GPUS = [  # every role on GPUs, bf16 (precision auto)
    "sft.resources={num_workers: 8, use_gpu: true, cpus_per_worker: 8}",
    "reward.resources={num_workers: 8, use_gpu: true, cpus_per_worker: 8}",
    "pretrain.resources={num_workers: 8, use_gpu: true, cpus_per_worker: 8}",
    "ppo.resources={rollout: {num_cpus: 4, num_gpus: 1}, policy: {num_cpus: 4, num_gpus: 1}, "
    "value: {num_cpus: 4, num_gpus: 1}, reference: {num_cpus: 2, num_gpus: 0.5}, "
    "reward: {num_cpus: 2, num_gpus: 0.5}}",
    "serve.gpus_per_replica=1",
]


def tiny(*overrides: str):
    return load_config(CONFIGS / "test.yaml", list(overrides))


def role(plan, stage: str, name: str):
    return next(r for s in plan.stages if s.name == stage for r in s.roles if r.role.startswith(name))


def stage(plan, name: str):
    return next(s for s in plan.stages if s.name == name)


# --------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("tied", [True, False])
def test_count_params_equals_the_model_modeling_builds(tiny_tokenizer, tied):
    cfg = TINY_MODEL.model_copy(update={"tie_word_embeddings": tied})  # test.yaml's sizes
    shape = model_shape(tiny(f"model.tie_word_embeddings={str(tied).lower()}",
                             f"tokenizer.vocab_size={tiny_tokenizer.vocab_size}"))
    assert count_params(shape) == count_parameters(new_policy(cfg, tiny_tokenizer))
    config = llama_config(cfg, tiny_tokenizer)
    config.num_labels = 1  # what load_scalar_model does
    scalar = LlamaForSequenceClassification(config)
    assert count_params(shape, scalar_head=True) == count_parameters(scalar)


def test_a_pretrained_folder_is_read_from_its_config_json(tiny_policy_dir, tiny_reward_dir):
    shape = model_shape(tiny(f"model.pretrained={tiny_policy_dir}"))
    assert (shape.hidden, shape.layers, shape.kv_heads, shape.max_seq_len) == (64, 2, 1, 512)
    assert count_params(shape) == count_parameters(load_policy(tiny_policy_dir))
    assert count_params(shape, scalar_head=True) == count_parameters(load_scalar_model(tiny_reward_dir))


def test_qwen2_folders_count_their_qkv_biases(tmp_path):
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    assert count_params(model_shape(tiny(f"model.pretrained={tmp_path}"))) == \
        count_parameters(Qwen2ForCausalLM(config))


def test_the_published_llama_2_counts():
    assert count_params(model_shape(tiny(*LLAMA2_7B))) == 6_738_415_616  # "6.74B"
    assert count_params(model_shape(tiny(*LLAMA2_70B))) == 68_976_648_192  # "68.98B"


def test_hand_counted_tiny_model():
    assert count_params(model_shape(tiny())) == TINY_PARAMS == 106_816


# --------------------------------------------------------------------------- memory per role


def test_a_cpu_training_worker_hand_computed():
    """test.yaml's SFT: 2 CPU workers, DDP, float32 (auto on a CPU), micro-batches of 4 x 512."""
    plan = plan_run(tiny(), 80)
    worker = role(plan, "sft", "worker")
    assert worker.weights == worker.grads == 4 * TINY_PARAMS and worker.optimizer == 8 * TINY_PARAMS
    # per token: 2 layers x (24h + 4(3h + 2*kv*d + 4i)) + (4 + 8) * vocab
    per_token = 2 * (24 * 64 + 4 * (3 * 64 + 2 * 32 + 4 * 128)) + 12 * 512
    assert worker.activations == 4 * 512 * per_token == 31_457_280
    assert worker.kv_cache == 0
    assert worker.fits is None and worker.budget is None  # on a CPU: host memory, not checked
    assert worker.placement == "2 x {CPU: 0.5} fp32 ddp"
    assert stage(plan, "sft").gpus == 0 and stage(plan, "sft").cpus == 1


def test_fsdp_divides_weights_gradients_and_optimizer_but_not_activations():
    ddp = role(plan_run(tiny("sft.resources.use_gpu=true"), 80), "sft", "worker")
    fsdp = role(plan_run(tiny("sft.resources.use_gpu=true", "sft.strategy=fsdp"), 80), "sft", "worker")
    assert fsdp.weights == ddp.weights / 2 and fsdp.optimizer == ddp.optimizer / 2
    assert fsdp.activations == ddp.activations
    # bf16 autocast on a GPU: bf16 activations plus a bf16 copy of the weights (2 B/param)
    assert ddp.activations == activation_bytes(model_shape(tiny()), 4 * 512, True, 8) + 2 * TINY_PARAMS


def test_the_reward_stage_counts_two_sequences_per_comparison_and_no_vocabulary():
    worker = role(plan_run(tiny(), 80), "reward", "worker")
    s = model_shape(tiny())
    assert worker.weights == 4 * count_params(s, scalar_head=True)
    assert worker.activations == activation_bytes(s, 4 * 2 * 512, False, None)


def test_rollout_kv_cache_hand_computed():
    """bf16 on a GPU: 2 (k, v) x 2 layers x 1 kv head x 32 x 2 bytes = 256 bytes per token."""
    args = ["ppo.resources.rollout.num_gpus=1", "ppo.prompts_per_step=80", "ppo.samples_per_prompt=2",
            "ppo.num_rollout_engines=2", "ppo.estimator=grpo", "ppo.eval_max_prompts=16"]
    cfg = tiny(*args)
    assert kv_bytes_per_token(model_shape(cfg), 2) == 256
    rollout = role(plan_run(cfg, 80), "ppo", "rollout")
    # each of the 2 engines runs 80 x 2 / 2 = 80 sequences of up to 512 tokens (the context), in
    # blocks of 128 tokens: 80 x 4 blocks x headroom 1.2 = 384 blocks
    assert rollout.kv_cache == 384 * 128 * 256
    assert rollout.weights == 2 * TINY_PARAMS
    assert rollout.budget == 80 * GB and rollout.fits  # the whole GPU: the cache is sized, not a share
    # the held-out prompts go out at once too: 256 of them over 2 engines is more than 80
    held_out = role(plan_run(tiny(*args, "ppo.eval_max_prompts=256"), 80), "ppo", "rollout")
    assert held_out.kv_cache == 615 * 128 * 256  # 128 x 4 x 1.2 = 614.4 blocks, rounded up


def test_tensor_parallelism_splits_weights_and_kv_cache():
    one = role(plan_run(tiny("ppo.resources.rollout.num_gpus=1"), 80), "ppo", "rollout")
    two = role(plan_run(tiny("ppo.resources.rollout.num_gpus=1", "ppo.resources.tensor_parallel_size=2"), 80),
               "ppo", "rollout")
    assert (two.weights, two.kv_cache) == (one.weights / 2, one.kv_cache / 2)
    assert two.placement == "1 x {CPU: 0.25, GPU: 2} tp 2"


def test_ppo_sequences_are_the_context_unless_the_prompt_length_is_given():
    assert stage(plan_run(tiny(), 80), "ppo").seq_len == 512
    assert stage(plan_run(tiny(), 80, prompt_tokens=100), "ppo").seq_len == 100 + 16  # + max_new_tokens


def test_critic_free_and_function_rewards_drop_their_roles():
    plan = plan_run(tiny("ppo.estimator=grpo", "ppo.samples_per_prompt=2", "ppo.reward_source=function",
                         "ppo.reward_function=m:f"), 80)
    assert [r.role for r in stage(plan, "ppo").roles] == ["rollout", "policy", "reference"]


# --------------------------------------------------------------------------- 7B and 70B on 80 GB GPUs


def ppo_gpus_in_comment(config: Path) -> int:
    """The GPU count a plan config's comment names ('# PPO on N GPUs, ...')."""
    found = re.search(r"^# PPO on (\d+) GPUs", config.read_text(), re.MULTILINE)
    assert found, f"{config} names no PPO GPU count"
    return int(found.group(1))


def test_a_7b_policy_needs_16_bytes_per_param_and_does_not_fit_one_80gb_gpu():
    policy = role(plan_run(tiny(*LLAMA2_7B, *ON_GPUS), 80), "ppo", "policy")
    assert policy.weights + policy.grads + policy.optimizer == 16 * P7B  # ~108 GB
    assert policy.weights + policy.grads + policy.optimizer == pytest.approx(107.8 * GB, rel=1e-3)
    assert policy.fits is False


@pytest.mark.parametrize("layout", [[], ["num_workers: 3, strategy: fsdp"]])
def test_7b_ppo_trainers_on_too_few_workers_are_told_how_many_fsdp_workers_they_need(layout):
    """One worker holds the whole 108 GB; three fsdp workers are still too few; four fit."""
    bundle = ", ".join(["num_cpus: 4, num_gpus: 1", *layout])
    plan = plan_run(load_config(PLAN_7B, [f"ppo.resources.policy={{{bundle}}}",
                                          f"ppo.resources.value={{{bundle}}}"]), 80)
    for name in ("policy", "value"):
        trainer = role(plan, "ppo", name)
        assert trainer.fits is False and trainer.total > 80 * GB
        assert trainer.note == f"needs strategy fsdp over >= 4 workers (ppo.resources.{name}.num_workers)"


@pytest.mark.parametrize("prompt_tokens", [None, 512])  # the whole context, and README's example
def test_the_7b_config_fits_every_ppo_role_on_the_gpus_its_comment_names(prompt_tokens):
    ppo = stage(plan_run(load_config(PLAN_7B), 80, prompt_tokens), "ppo")
    assert [(r.role, r.count, r.fits, r.note) for r in ppo.roles] == [
        ("rollout", 2, True, ""), ("policy", 4, True, ""), ("reference", 2, True, ""),
        ("value", 4, True, ""), ("reward", 2, True, "")]
    # every bundle x its count: 2 engines x tp 2, 4 + 4 workers, 2 + 2 replicas, a GPU each
    assert ppo.gpus == 2 * 2 + 4 + 4 + 2 + 2 == ppo_gpus_in_comment(PLAN_7B)
    assert ppo.cpus == 2 * 4 + 4 * 4 + 4 * 4 + 2 * 2 + 2 * 2
    assert ppo.roles[1].placement == "4 x {CPU: 4, GPU: 1} bf16 fsdp"
    assert ppo.roles[2].placement == "2 x {CPU: 2, GPU: 1} bf16 replicate"


def test_fsdp_divides_a_trained_roles_state_by_its_workers_and_ddp_does_not():
    s = model_shape(load_config(PLAN_7B))
    fsdp = role(plan_run(load_config(PLAN_7B), 80), "ppo", "policy")  # 4 workers
    ddp = role(plan_run(load_config(PLAN_7B, ["ppo.resources.policy.strategy=ddp"]), 80), "ppo", "policy")
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * P7B, 4 * P7B, 8 * P7B)
    assert (fsdp.weights, fsdp.grads, fsdp.optimizer) == (4 * P7B / 4, 4 * P7B / 4, 8 * P7B / 4)
    # either way each worker trains on its share of a mini-batch (4 sequences / 4 workers) and
    # rank 0 holds one weight-sync bucket; ddp keeps autocast's bf16 copy of all weights,
    # fsdp gathers one unit at a time in bf16 (the root, the largest) and its float32 gradient
    one_sequence = activation_bytes(s, 1 * 4096, True, 16)
    assert ddp.activations == one_sequence + 2 * P7B + BUCKET
    assert fsdp.activations == one_sequence + (2 + 4) * UNIT_7B + BUCKET
    # fsdp on one worker does not shard (rl/roles.py): autocast and its copy again
    alone = role(plan_run(load_config(PLAN_7B, ["ppo.resources.policy.num_workers=1"]), 80), "ppo", "policy")
    assert alone.weights == 4 * P7B and alone.activations == activation_bytes(s, 4 * 4096, True, 16) \
        + 2 * P7B + BUCKET


def test_fsdp_divides_a_frozen_roles_weights_by_its_replicas_and_replicate_does_not():
    s = model_shape(load_config(PLAN_7B))
    replicate = role(plan_run(load_config(PLAN_7B), 80), "ppo", "reference")  # 2 replicas
    fsdp = role(plan_run(load_config(PLAN_7B, ["ppo.resources.reference.strategy=fsdp"]), 80),
                "ppo", "reference")
    assert (replicate.weights, fsdp.weights) == (4 * P7B, 4 * P7B / 2)  # float32
    # each replica scores its half of the 16 sequences of a step at once; fsdp's replicas gather
    # one unit at a time in bf16 (autocast's casts, without gradients, are not kept)
    assert replicate.activations == forward_bytes(s, 8 * 4096, True, True)
    assert fsdp.activations == forward_bytes(s, 8 * 4096, True, True) + 2 * UNIT_7B
    assert replicate.grads == replicate.optimizer == 0


def test_frozen_roles_are_told_how_many_replicas_or_shards_they_need():
    # 64 sequences scored at once by one 7B reference replica: 177 GB of activations
    busy = role(plan_run(load_config(PLAN_7B, ["ppo.prompts_per_step=64",
                                               "ppo.resources.reference.num_replicas=1"]), 80),
                "ppo", "reference")
    assert busy.fits is False
    assert busy.note == "needs strategy replicate over >= 4 replicas (ppo.resources.reference.num_replicas)"
    # 70B in float32 is 276 GB: more replicas of the whole cannot help, shards can
    whole = role(plan_run(load_config(PLAN_70B, ["ppo.resources.reference.strategy=replicate"]), 80),
                 "ppo", "reference")
    assert whole.note == "needs strategy fsdp over >= 5 replicas (ppo.resources.reference.num_replicas)"


def test_the_70b_config_fits_every_ppo_role_on_the_gpus_its_comment_names():
    """64 GPUs at the default sequence (the whole context): policy and value sharded 22 ways
    under FSDP's bf16 gather (no autocast copy) with activation checkpointing."""
    ppo = stage(plan_run(load_config(PLAN_70B), 80), "ppo")
    assert ppo.seq_len == 4096
    assert [(r.role, r.count, r.fits, r.note) for r in ppo.roles] == [
        ("rollout", 2, True, ""), ("policy", 22, True, ""), ("reference", 6, True, ""),
        ("value", 22, True, ""), ("reward", 6, True, "")]
    assert ppo.gpus == 2 * 4 + 22 + 22 + 6 + 6 == ppo_gpus_in_comment(PLAN_70B) == 8 * 8
    policy = ppo.roles[1]
    assert policy.placement == "22 x {CPU: 4, GPU: 1} bf16 fsdp"
    assert policy.weights + policy.grads + policy.optimizer == 16 * P70B / 22
    # one 4096-token sequence per worker, checkpointed: each layer's bf16 input (80 x 8192 x 2 B
    # per token), one layer recomputed, PPO's logits; one gathered bf16 decoder layer and its
    # float32 gradient; rank 0's weight-sync bucket
    s = model_shape(load_config(PLAN_70B))
    one_layer = 24 * 8192 + 2 * (3 * 8192 + 2 * 8 * 128 + 4 * 28672)
    update = 4096 * (80 * 8192 * 2 + one_layer + (2 + 16) * 32000)
    assert activation_bytes(s, 4096, True, 16, checkpointed=True) == update
    assert policy.activations == update + 6 * UNIT_70B + BUCKET


def test_70b_trainers_without_activation_checkpointing_are_told_to_turn_it_on():
    """Without it one 4096-token sequence saves ~159 GB: no number of workers fits."""
    plan = plan_run(load_config(PLAN_70B, ["ppo.activation_checkpointing=false"]), 80)
    for name, n in (("policy", 17), ("value", 17)):
        trainer = role(plan, "ppo", name)
        assert trainer.fits is False and trainer.activations > 159 * GB
        assert trainer.note == (f"needs ppo.activation_checkpointing: true and strategy fsdp over "
                                f">= {n} workers (ppo.resources.{name}.num_workers)")


def test_activation_checkpointing_keeps_each_layers_input_and_one_layer():
    s = model_shape(tiny())  # 2 layers, hidden 64, float32 on a CPU
    full = activation_bytes(s, 100, False, 16)
    kept = activation_bytes(s, 100, False, 16, checkpointed=True)
    one_layer = activation_bytes(replace(s, layers=1), 100, False, None)
    assert kept == 100 * 2 * 64 * 4 + one_layer + 100 * (4 + 16) * 512
    assert full - kept == one_layer - 100 * 2 * 64 * 4  # the second layer's, less the kept inputs
    # test.yaml's policy: one worker, mini-batches of 4 x 512 tokens; the update is its largest pass
    on = role(plan_run(tiny("ppo.activation_checkpointing=true"), 80), "ppo", "policy")
    off = role(plan_run(tiny(), 80), "ppo", "policy")
    assert off.activations - on.activations == (full - kept) * 4 * 512 // 100


def test_7b_sft_needs_fsdp_and_fits_over_the_gpus_the_plan_names():
    short = [*LLAMA2_7B, *ON_GPUS, "sft.micro_batch_size=1", "model.max_seq_len=512", "pretrain.seq_len=512"]
    worker = role(plan_run(tiny(*short), 80), "sft", "worker")
    assert worker.fits is False and "fsdp over >= 2 GPUs" in worker.note
    sharded = role(plan_run(tiny(*short, "sft.strategy=fsdp", "sft.resources.num_workers=2"), 80),
                   "sft", "worker")
    assert sharded.fits and sharded.weights + sharded.grads + sharded.optimizer == 8 * 6_738_415_616


def test_70b_rollouts_need_tensor_parallelism_on_80gb_gpus():
    cfg = [*LLAMA2_70B, *ON_GPUS, "ppo.kv_cache.memory_fraction=0.9"]
    rollout = role(plan_run(tiny(*cfg), 80), "ppo", "rollout")
    assert rollout.weights == 2 * 68_976_648_192 == pytest.approx(138 * GB, rel=1e-3)  # bf16
    assert rollout.fits is False and "tensor_parallel_size >= 2" in rollout.note
    split = role(plan_run(tiny(*cfg, "ppo.resources.tensor_parallel_size=2"), 80), "ppo", "rollout")
    assert split.fits and split.weights == rollout.weights / 2


def test_70b_training_cannot_fit_80gb_gpus_at_any_fsdp_size():
    """loop.py shards float32 weights, but bf16 autocast saves a whole bf16 copy on every worker."""
    cfg = [*LLAMA2_70B, *ON_GPUS, "sft.strategy=fsdp", "sft.resources.num_workers=64", "sft.batch_size=64",
           "sft.micro_batch_size=1"]
    worker = role(plan_run(tiny(*cfg), 80), "sft", "worker")
    assert worker.weights + worker.grads + worker.optimizer == 16 * 68_976_648_192 / 64
    assert worker.fits is False and "bf16 copy of all weights (138 GB)" in worker.note


def test_suggested_tensor_parallelism_divides_the_heads():
    """70B at kv_cache.memory_fraction 0.5: 138 GB / 40 GB needs 4 GPUs (3 would not divide 64 heads)."""
    plan = plan_run(tiny(*LLAMA2_70B, *ON_GPUS, "ppo.kv_cache.memory_fraction=0.5"), 80)
    rollout = role(plan, "ppo", "rollout")
    assert "tensor_parallel_size >= 4" in rollout.note


def test_a_fractional_gpu_that_would_fit_a_whole_one_is_told_so():
    reference = role(plan_run(tiny(*LLAMA2_7B, *ON_GPUS, "ppo.prompts_per_step=16"), 80), "ppo", "reference")
    assert reference.budget == 40 * GB and reference.weights == 4 * 6_738_415_616  # float32 weights
    assert reference.fits is False and reference.note == "give it a whole GPU (num_gpus: 1)"


# --------------------------------------------------------------------------- placement and GPUs


def test_gpus_whole_bundles_as_asked_fractions_packed():
    assert gpus_for([]) == 0
    assert gpus_for([0.5, 0.5, 0.25, 0.75, 1, 2]) == 5
    assert gpus_for([0.6, 0.6, 0.3]) == 2


def test_gpu_count_is_the_largest_training_stage_and_serving_separately():
    plan = plan_run(tiny(*ON_GPUS, "ppo.num_rollout_engines=2", "ppo.resources.tensor_parallel_size=2",
                         "serve.max_replicas=2"), 80)
    # rollouts 2 x 2, policy 1, value 1, reference + reward 0.5 + 0.5 on one GPU
    assert stage(plan, "ppo").gpus == 7
    assert [s.gpus for s in plan.stages] == [8, 8, 8, 7, 6]  # serve: 3 chat stages x 2 replicas
    assert (plan.training_gpus, plan.serve_gpus) == (8, 6)
    assert role(plan, "serve", "reward").budget is None  # the reward replica runs on a CPU


def test_every_worker_and_replica_is_a_bundle_of_its_own():
    plan = plan_run(tiny(*ON_GPUS, "ppo.resources.policy.num_workers=2",
                         "ppo.resources.reference.num_replicas=3"), 80)
    # rollout 1, policy 2 x 1, value 1, reference 3 x 0.5 + reward 0.5 on two GPUs
    assert stage(plan, "ppo").gpus == 1 + 2 + 1 + 2
    assert stage(plan, "ppo").cpus == 4 + 2 * 4 + 4 + 3 * 2 + 2


def test_the_demo_config_runs_on_cpus_only():
    plan = plan_run(load_config(CONFIGS / "demo.yaml"), 80)
    assert (plan.training_gpus, plan.serve_gpus) == (0, 0)
    assert all(r.fits is None for s in plan.stages for r in s.roles)


def test_a_pretrained_model_skips_pretraining(tiny_policy_dir):
    plan = plan_run(tiny(f"model.pretrained={tiny_policy_dir}"), 80)
    assert [s.name for s in plan.stages] == ["sft", "reward", "ppo", "serve"]
    assert role(plan, "serve", "sft/rlhf")  # no base/ of its own to serve


def test_format_plan_is_a_table_per_stage_and_a_gpu_summary():
    text = format_plan(plan_run(tiny(*LLAMA2_7B, *ON_GPUS), 80))
    assert "6.74B parameters" in text
    assert "role   | placement" in text and "total/device" in text and "KV cache" in text
    for name in ("pretrain:", "sft:", "reward:", "ppo:", "serve:"):
        assert f"\n{name} " in text
    assert " NO\n" in text
    assert "  - worker: activations exceed the GPU: sft.micro_batch_size <= 2, then re-plan" in text
    assert text.splitlines()[-1].startswith("GPUs: 8 to train")


# --------------------------------------------------------------------------- the estimates and errors


@pytest.mark.parametrize("bf16", [True, False])
def test_per_layer_activations_match_what_autograd_saves(bf16):
    """The per-layer formula against the bytes autograd really keeps (one layer's difference)."""
    def saved(layers: int) -> int:
        cfg = TINY_MODEL.model_copy(update={"num_layers": layers, "hidden_size": 128, "num_heads": 2})
        tokenizer = type("T", (), {"vocab_size": 300, "bos_id": 0, "pad_id": 1, "stop_ids": [2]})()
        model = new_policy(cfg, tokenizer)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                model.model(input_ids=torch.randint(0, 300, (2, 64)))
        layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
        return sum(storages.values()) - (2 * layer_params * layers if bf16 else 0)  # minus autocast's copies

    shape = ModelShape(1, 128, 2, 1, 64, 128, 300, 512, True)  # one layer of TINY_MODEL, 128 wide
    assert saved(3) - saved(2) == pytest.approx(activation_bytes(shape, 2 * 64, bf16, None), rel=0.1)


@pytest.mark.parametrize("gb", [0, -80])
def test_gpu_memory_must_be_positive(gb):
    with pytest.raises(PlanError, match="gpu_memory_gb"):
        plan_run(tiny(), gb)


def test_a_pretrained_folder_without_config_json_is_named(tmp_path):
    with pytest.raises(PlanError, match=r"model.pretrained: .*config.json"):
        plan_run(tiny(f"model.pretrained={tmp_path}"), 80)


def test_a_pretrained_folder_missing_here_asks_for_explicit_sizes(tmp_path):
    with pytest.raises(PlanError, match="model.pretrained: .* not found on this machine.*model.hidden_size"):
        plan_run(tiny(f"model.pretrained={tmp_path / 'absent'}"), 80)


def test_a_config_json_missing_a_size_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(PlanError, match="config.json: no 'num_attention_heads'"):
        plan_run(tiny(f"model.pretrained={tmp_path}"), 80)
