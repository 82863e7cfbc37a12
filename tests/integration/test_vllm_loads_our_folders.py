"""vLLM (the real CPU engine) loads the folders we save and agrees with transformers and tiktoken."""

import pytest
import torch
from vllm import LLM, PoolingParams, SamplingParams
from vllm.inputs import TokensPrompt

from rlhf_ray.config import KVCacheConfig
from rlhf_ray.data.records import Message
from rlhf_ray.memory import vllm_memory_args
from rlhf_ray.modeling import load_policy, load_scalar_model
from rlhf_ray.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

TEXTS = [
    "The capital of France is Paris.",
    "Ça coûte 12,50 € à Genève. 東京は日本の首都です。🙂🇯🇵",
    "def f(x):\n    return x ** 2\n",
]
PROMPTS = ["The capital of", "The capital of France is Paris. The", "Ça"]


def _engine(folder, **kwargs) -> LLM:
    return LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
               **vllm_memory_args(folder, KVCacheConfig(), len(PROMPTS), "float32"), **kwargs)


def _shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def policy_engine(tiny_policy_dir):
    llm = _engine(tiny_policy_dir)
    yield llm
    _shutdown(llm)


def test_vllm_tokenizer_gives_tiktokens_ids(policy_engine, tiny_policy_dir):
    ours = load_tokenizer(tiny_policy_dir)
    theirs = policy_engine.get_tokenizer()
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    # Hugging Face tokenizers parse special-token text inside a string; ours never does (so user
    # text cannot forge a turn). Both agree on the special tokens' ids.
    for token, token_id in ours.special_ids.items():
        assert theirs.encode(token, add_special_tokens=False) == [token_id]


def test_vllm_chat_renders_our_chat_format(policy_engine, tiny_policy_dir):
    ours = load_tokenizer(tiny_policy_dir)
    conversation = [Message(role="user", content="What is the capital of France?")]
    out = policy_engine.chat([m.model_dump() for m in conversation],
                             SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert list(out[0].prompt_token_ids) == ours.render_prompt(conversation)


def test_greedy_continuations_match_transformers(policy_engine, tiny_policy_dir):
    tokenizer = load_tokenizer(tiny_policy_dir)
    model = load_policy(tiny_policy_dir).eval()
    prompts = [tokenizer.encode_document(p) for p in PROMPTS]
    outputs = policy_engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        vllm_ids = list(output.outputs[0].token_ids)
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        hf_ids = hf[0, len(prompt):].tolist()
        assert vllm_ids == hf_ids[: len(vllm_ids)], tokenizer.decode(prompt)
        assert len(vllm_ids) == len(hf_ids)  # both stop at the same stop token, or both run to the limit
    assert tokenizer.decode(list(outputs[0].outputs[0].token_ids)).startswith(" France is Paris.")


def test_vllm_scores_with_the_reward_folder_as_transformers_does(tiny_reward_dir):
    tokenizer = load_tokenizer(tiny_reward_dir)
    model = load_scalar_model(tiny_reward_dir).eval()
    conversations = [
        [Message(role="user", content="What is the capital of France?"),
         Message(role="assistant", content=answer)]
        for answer in ("The capital of France is Paris.", "I am not sure.")
    ]
    ids = [tokenizer.render_chat(c)[0] for c in conversations]
    llm = _engine(tiny_reward_dir, runner="pooling")
    try:
        outputs = llm.classify([TokensPrompt(prompt_token_ids=i) for i in ids],
                               pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    finally:
        _shutdown(llm)
    for prompt_ids, output in zip(ids, outputs):
        with torch.no_grad():
            expected = model(torch.tensor([prompt_ids])).logits[0, 0].item()
        assert output.outputs.probs[0] == pytest.approx(expected, abs=1e-4)
