"""A widely used evaluation harness, installed from PyPI, against the server: EleutherAI's
lm-eval scores multiple choice by log-likelihood (completions with echo, logprobs and token-id
prompts) and generates until a stop string, with zero failed requests; its log-likelihoods are the
ones transformers computes from the same folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray.modeling import load_policy
from rlhf_ray.tokenizer import ChatTokenizer, load_tokenizer
from tests.served import KEY

pytestmark = pytest.mark.integration

TASKS = Path(__file__).with_name("lm_eval_tasks")


# lm-eval tokenizes with the model folder's tokenizer, through the router, or (auto, as against
# vLLM's one-model server) asks the server's /tokenizer_info, /tokenize and /detokenize, here at
# the base stage's own URL.
@pytest.mark.parametrize("tokenizer", ["huggingface", "auto"])
def test_lm_eval_scores_the_base_model_over_the_completions_api(url, served, tmp_path, tokenizer):
    base_folder = served[1].run_dir / "base"
    backend = [f"tokenizer={base_folder}"] if tokenizer == "huggingface" else [f"auth_token={KEY}"]
    base_url = f"{url}/v1/completions" if tokenizer == "huggingface" else f"{url}/base/v1/completions"
    args = ",".join([f"base_url={base_url}", "model=base", f"tokenizer_backend={tokenizer}",
                     *backend, "tokenized_requests=True", "num_concurrent=2", "max_retries=1",
                     "max_length=512"])
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
         "--tasks", "capitals,capitals_gen", "--include_path", str(TASKS),
         "--output_path", str(tmp_path), "--batch_size", "1", "--log_samples"],
        capture_output=True, text=True, timeout=600, env=env, cwd=TASKS)  # data_files are relative
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    if tokenizer == "auto":
        assert "Using remote tokenizer backend" in run.stderr + run.stdout
    [results_file] = tmp_path.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["capitals"]["acc,none"] == 1.0  # the model has the four capitals by heart
    assert results["capitals_gen"]["exact_match,strip"] == 1.0
    [samples_file] = tmp_path.rglob("samples_capitals_2*.jsonl")
    tokenizer, model = load_tokenizer(base_folder), load_policy(base_folder).eval()
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        for args, [[served_logprob, _]] in zip(sample["arguments"].values(), sample["resps"]):
            reference = continuation_logprob(tokenizer, model, args["arg_0"], args["arg_1"])
            assert float(served_logprob) == pytest.approx(reference, abs=0.02), args


def continuation_logprob(tokenizer: ChatTokenizer, model: torch.nn.Module, context: str,
                         continuation: str) -> float:
    """log p(continuation | context) by a transformers forward pass, tokenized as lm-eval does:
    the whole text, split where the context's own tokens end; no BOS (its tokenizer adds none)."""
    ids, start = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
    return sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids)))
