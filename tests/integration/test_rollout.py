"""The PPO rollout engine: vLLM samples with the policy's weights, takes new ones in place, and
reports logprobs the trainer can reproduce."""

import pytest
import ray
import torch

from rlhf_ray.modeling import load_policy
from rlhf_ray.rl.roles import pack_rollouts, sequence_logprobs
from rlhf_ray.rl.rollout import RolloutActor, RolloutEngine, StaleWeightsError
from rlhf_ray.tokenizer import load_tokenizer
from tests.tiny import FACTS as FACTS_TEXT, memorise

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of", "The capital of France is", "The capital of Peru is Lima. The", "Ça"]
NEW_FACTS = "The capital of France is Lyon. The capital of Peru is Cusco. The capital of Kenya is Mombasa."


@pytest.fixture(scope="module")
def engine(tiny_policy_dir):
    engine = RolloutEngine(tiny_policy_dir, max_model_len=512, sequences=8)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_policy_dir) -> list[list[int]]:
    tokenizer = load_tokenizer(tiny_policy_dir)
    return [tokenizer.encode_document(p) for p in PROMPTS]


def _hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def _greedy(engine: RolloutEngine, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    rollouts = engine.generate(prompts, max_new_tokens, temperature=0.0, top_p=1.0,
                               expected_version=engine.weight_version)
    return [r.response_ids for r in rollouts]


def test_the_engine_reserves_the_kv_cache_computed_for_its_sequences(engine, prompts):
    """8 sequences of the 512-token context: 4 blocks of 128 each, x 1.2 headroom = 39 blocks,
    asked of vLLM in bytes (2 layers x K,V x 1 KV head x 32 x float32 = 512 bytes a token)."""
    cache = engine.llm.llm_engine.vllm_config.cache_config
    assert engine.kv_cache_bytes == cache.kv_cache_memory_bytes == 39 * 128 * 512
    assert (cache.num_gpu_blocks, cache.block_size) == (39, 128)
    # More sequences than the cache was sized for wait their turn: all are answered.
    assert len(engine.generate(prompts * 5, 8, temperature=1.0, top_p=1.0, expected_version=0)) == 20


def test_rollouts_carry_ids_logprobs_finish_reasons_and_version(engine, prompts, tiny_policy_dir):
    stop_ids = load_tokenizer(tiny_policy_dir).stop_ids
    rollouts = engine.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1.0,
                               expected_version=0, seed=0)
    assert engine.weight_version == 0
    assert len(rollouts) == len(prompts)
    for prompt, r in zip(prompts, rollouts):
        assert r.prompt_ids == prompt
        assert 1 <= len(r.response_ids) <= 8
        assert len(r.logprobs) == len(r.response_ids)
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert r.weight_version == 0
        if r.finish_reason == "stop":
            assert r.response_ids[-1] in stop_ids
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 8
    # A seed makes sampling reproducible.
    again = engine.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1.0,
                            expected_version=0, seed=0)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]


def test_greedy_rollouts_match_transformers(engine, prompts, tiny_policy_dir):
    model = load_policy(tiny_policy_dir).eval()
    for prompt, response in zip(prompts, _greedy(engine, prompts)):
        assert response == _hf_greedy(model, prompt, 16)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_logprobs_match_the_policys_recomputed_logprobs(engine, prompts, tiny_policy_dir,
                                                                 temperature):
    """The rollout/trainer logprob mismatch PPO's ratio starts from is ~0 with the same weights,
    at any temperature: both are of softmax(logits / T), the distribution that was sampled."""
    model = load_policy(tiny_policy_dir).eval()
    rollouts = engine.generate(prompts * 4, max_new_tokens=24, temperature=temperature, top_p=1.0,
                               expected_version=engine.weight_version, seed=1)
    exp = pack_rollouts(rollouts, load_tokenizer(tiny_policy_dir).pad_id, temperature)
    with torch.no_grad():
        recomputed = sequence_logprobs(model, exp.sequences, exp.attention_mask, temperature)
        untempered = sequence_logprobs(model, exp.sequences, exp.attention_mask)
    mask = exp.response_mask.bool()
    worst = (recomputed - exp.sample_logprobs)[mask].abs().max().item()
    assert worst < 1e-3, worst
    if temperature != 1:  # the engine does not report the T = 1 logprobs
        assert (untempered - exp.sample_logprobs)[mask].abs().max().item() > 0.05


def test_weight_sync_changes_generation_to_the_new_weights(engine, prompts, tiny_policy_dir):
    tokenizer = load_tokenizer(tiny_policy_dir)
    original = load_policy(tiny_policy_dir)
    before = _greedy(engine, prompts)

    # A policy step's worth of change: train the policy a little on other "facts".
    model = load_policy(tiny_policy_dir)
    memorise(model, torch.tensor([tokenizer.encode_document(NEW_FACTS)]), steps=30)
    model.eval()

    engine.load_weights(model.state_dict(), version=1)
    assert engine.weight_version == 1
    after = _greedy(engine, prompts)
    for prompt, response in zip(prompts, after):
        assert response == _hf_greedy(model, prompt, 16)
    assert after != before
    assert tokenizer.decode(after[1]).startswith(" Ly")  # "Lyon", as far as 30 steps learn it

    # Sampling from weights other than the caller's is refused, naming both versions.
    with pytest.raises(StaleWeightsError, match=r"version 1.*version 0"):
        engine.generate(prompts, 4, temperature=1.0, top_p=1.0, expected_version=0)

    # Syncing the original weights back restores the original generations.
    engine.load_weights(original.state_dict(), version=2)
    assert engine.weight_version == 2
    assert _greedy(engine, prompts) == before


def test_weight_sync_drops_cached_prompt_blocks_of_the_old_weights(engine, tiny_policy_dir):
    """A prompt longer than a KV block (128 tokens on the CPU) is prefix-cached; after a sync the
    cached keys/values of the old weights must not be reused."""
    tokenizer = load_tokenizer(tiny_policy_dir)
    long_prompt = [tokenizer.encode_document(" ".join([FACTS_TEXT] * 6) + " The capital of")]
    assert len(long_prompt[0]) > 2 * 128
    original = load_policy(tiny_policy_dir)
    engine.load_weights(original.state_dict(), version=10)
    assert _greedy(engine, long_prompt) == [_hf_greedy(original, long_prompt[0], 16)]  # cached now

    model = load_policy(tiny_policy_dir)
    memorise(model, torch.tensor([tokenizer.encode_document(NEW_FACTS)]), steps=30)
    model.eval()
    engine.load_weights(model.state_dict(), version=11)
    assert _greedy(engine, long_prompt) == [_hf_greedy(model, long_prompt[0], 16)]
    engine.load_weights(original.state_dict(), version=12)


def test_rollout_actor_generates_under_ray_on_a_machine_new_to_vllm(engine, prompts, tiny_policy_dir,
                                                                    tmp_path):
    # `engine` is requested only so that this test runs last and the fixture's engine is shared.
    # A new machine: vLLM's cache is empty, so vLLM would inspect the model's class in a new
    # Python process (and cache the answer in modelinfos/) unless the engine has it done in its own.
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False)
    new_cache = tmp_path / "vllm-cache"
    actor = RolloutActor.options(num_cpus=1, runtime_env={"env_vars": {"VLLM_CACHE_ROOT": str(new_cache)}}
                                 ).remote(tiny_policy_dir, max_model_len=512, sequences=8)
    try:
        rollouts = ray.get(actor.generate.remote(prompts, 16, 0.0, 1.0, 0), timeout=300)
        assert [r.response_ids for r in rollouts] == _greedy(engine, prompts)
        assert all(r.weight_version == 0 for r in rollouts)
        assert not (new_cache / "modelinfos").exists()
        ray.get(actor.shutdown.remote())
    finally:
        ray.kill(actor)
        if started_here:
            ray.shutdown()
