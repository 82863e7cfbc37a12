"""The KV cache every vLLM engine asks for is computed from what it holds, and a run refuses, with
the numbers, what this machine cannot hold: whatever the size of the machine's NUMA node."""

import json
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, KVCacheConfig, load_config
from rlhf_ray.memory import (
    GB,
    ROLE_PROCESS_BYTES,
    MachineMemoryError,
    ModelShape,
    NodeMemory,
    check_kv_fits,
    check_machine_fits,
    kv_cache_bytes,
    numa_node_memory,
    rollout_sequences,
    shape_from_folder,
    vllm_memory_args,
)
from rlhf_ray.plan import check_fits_here, ppo_stage

CONFIGS = Path(__file__).parents[2] / "configs"
# configs/demo.yaml's model: 4 layers, 4 KV heads of 64, context 256.
DEMO = ModelShape(layers=4, hidden=256, heads=4, kv_heads=4, head_dim=64, intermediate=768,
                  vocab=1536, max_seq_len=256, tied=True)
DEMO_PER_TOKEN = 2 * 4 * 4 * 64 * 4  # K and V x layers x KV heads x head size x float32 = 8 KiB


def _folder(tmp_path: Path, s: ModelShape) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({
        "num_hidden_layers": s.layers, "hidden_size": s.hidden, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "intermediate_size": s.intermediate,
        "vocab_size": s.vocab, "max_position_embeddings": s.max_seq_len}))
    return tmp_path


def test_the_cache_holds_every_sequence_in_whole_blocks_with_headroom():
    # 64 sequences of 256 tokens = 2 blocks of 128 each; x 1.2 = 153.6 -> 154 blocks
    assert kv_cache_bytes(DEMO, 4, 64, 256, KVCacheConfig()) == 154 * 128 * DEMO_PER_TOKEN
    # a 200-token sequence still takes 2 whole blocks; headroom 1: exactly them
    assert kv_cache_bytes(DEMO, 4, 3, 200, KVCacheConfig(headroom=1)) == 6 * 128 * DEMO_PER_TOKEN
    # bf16 halves it
    assert kv_cache_bytes(DEMO, 2, 64, 256, KVCacheConfig()) == 154 * 128 * DEMO_PER_TOKEN // 2


def test_a_token_budget_is_rounded_to_blocks_and_holds_at_least_one_context():
    assert kv_cache_bytes(DEMO, 4, 64, 256, KVCacheConfig(tokens=1000)) == 8 * 128 * DEMO_PER_TOKEN
    assert kv_cache_bytes(DEMO, 4, 64, 256, KVCacheConfig(tokens=10)) == 2 * 128 * DEMO_PER_TOKEN
    assert kv_cache_bytes(DEMO, 4, 64, 256, KVCacheConfig(bytes=12345)) == 12345


def test_engines_are_given_bytes_and_a_batch_limit_and_a_fraction_only_when_asked(tmp_path):
    folder = _folder(tmp_path, DEMO)
    assert vllm_memory_args(folder, KVCacheConfig(), 64, "float32") == {
        "kv_cache_memory_bytes": 154 * 128 * DEMO_PER_TOKEN, "max_num_seqs": 64}
    # an engine that never sees more than 100 tokens (the longest prompt + max_new_tokens; its
    # max_model_len) needs one block per sequence, not the context's two: 64 x 1.2 -> 77 blocks
    assert vllm_memory_args(folder, KVCacheConfig(), 64, "float32", seq_len=100)[
        "kv_cache_memory_bytes"] == 77 * 128 * DEMO_PER_TOKEN
    # more than vLLM's batch of 256 wait their turn: the cache is sized for 256
    assert vllm_memory_args(folder, KVCacheConfig(), 5000, "bfloat16")["max_num_seqs"] == 256
    assert vllm_memory_args(folder, KVCacheConfig(memory_fraction=0.3), 8, "float32") == {
        "gpu_memory_utilization": 0.3, "max_num_seqs": 8}


def test_a_rollout_engine_holds_its_share_of_a_step_or_of_the_held_out_prompts():
    ppo = load_config(CONFIGS / "demo.yaml").ppo  # 64 prompts a step, 128 held out at most
    assert rollout_sequences(ppo) == 128
    assert rollout_sequences(ppo.model_copy(update={"num_rollout_engines": 3})) == 43
    assert rollout_sequences(ppo.model_copy(update={"eval_max_prompts": 8, "samples_per_prompt": 2})) == 128


@pytest.mark.parametrize("node_gb", [7.6, 14.0, 24.0])
def test_the_same_cache_fits_every_node_size_seen(node_gb):
    """The fraction that was tuned on one box (0.05) left -0.06 GB on a 14 GB node; a computed size
    is the same on every node, and fits wherever the node has it free."""
    demo_engine = kv_cache_bytes(DEMO, 4, 128, 256, KVCacheConfig())
    assert demo_engine == 308 * 128 * DEMO_PER_TOKEN  # 0.32 GB, whatever the node
    busy = NodeMemory(0, int(node_gb * GB), int((node_gb - 5.2) * GB))  # 5.2 GB held by others
    check_kv_fits("PPO rollout0", demo_engine, busy)
    check_kv_fits("two engines", 2 * demo_engine, busy)


def test_a_cache_the_node_cannot_hold_is_refused_with_the_numbers():
    node = NodeMemory(0, int(7.6 * GB), int(0.2 * GB))
    with pytest.raises(MachineMemoryError) as e:
        check_kv_fits("PPO rollout0", int(0.32 * GB), node)
    assert str(e.value).startswith("PPO rollout0: a KV cache of 0.32 GB does not fit the 0.20 GB "
                                   "available on NUMA node 0 (of 7.60 GB)")
    assert "kv_cache.tokens" in str(e.value)


def test_what_this_machine_reports_is_read_like_vllm_reads_it():
    node = numa_node_memory()
    assert 0 < node.available <= node.total


def test_roles_that_together_exceed_the_machine_are_all_named():
    with pytest.raises(MachineMemoryError) as e:
        check_machine_fits("the ppo stage", {"2 x rollout": 3e15, "policy": 1e9}, {})
    message = str(e.value)
    assert "the ppo stage needs 3000001.00 GB (2 x rollout 3000000.00 GB, policy 1.00 GB)" in message
    assert "available of" in message


def test_the_test_and_demo_runs_fit_this_machine(tmp_path):
    folder = _folder(tmp_path, DEMO)
    for name in ("test.yaml", "demo.yaml"):
        cfg = load_config(CONFIGS / name, ["compare={labeler: demo}"])
        for stage in ("ppo", "compare", "serve"):
            check_fits_here(cfg, stage, folder)


def test_a_machine_too_small_for_a_stage_is_refused_before_anything_starts(tmp_path):
    cfg = load_config(CONFIGS / "test.yaml", ["ppo.num_rollout_engines=1000"])
    with pytest.raises(MachineMemoryError, match=r"the ppo stage needs .*1000 x rollout"):
        check_fits_here(cfg, "ppo", _folder(tmp_path, DEMO))


def test_every_ppo_worker_and_replica_is_a_process_holding_its_share(tmp_path, monkeypatch):
    needs: dict[str, float] = {}
    monkeypatch.setattr("rlhf_ray.plan.check_machine_fits", lambda what, n, kv: needs.update(n))
    cfg = load_config(CONFIGS / "test.yaml", ["ppo.resources.policy={num_workers: 2, strategy: fsdp}",
                                              "ppo.resources.reference.num_replicas=3"])
    folder = _folder(tmp_path, DEMO)
    check_fits_here(cfg, "ppo", folder)
    roles = {r.role: r for r in ppo_stage(cfg, shape_from_folder(folder), 80 * GB, None).roles}
    assert needs["2 x policy"] == 2 * (roles["policy"].total + ROLE_PROCESS_BYTES)
    assert needs["3 x reference"] == 3 * (roles["reference"].total + ROLE_PROCESS_BYTES)
    assert needs["value"] == roles["value"].total + ROLE_PROCESS_BYTES


def test_the_fraction_setting_moved_and_says_where(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("ppo:\n  steps: 2\n  vllm_memory_fraction: 0.05\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert f"{config}:1: ppo: " in str(e.value) and "set kv_cache.memory_fraction" in str(e.value)
    with pytest.raises(ConfigError, match=r"serve.kv_cache: .*at most one of tokens, bytes, "
                                          r"memory_fraction \(got tokens, memory_fraction\)"):
        load_config(CONFIGS / "test.yaml", ["serve.kv_cache={tokens: 100, memory_fraction: 0.2}"])
