"""DPO as a stage on real Ray Train: two DDP workers train sft/ on the run's comparisons against
sft/ as the reference, write their metrics and checkpoints, and leave dpo/, a Hugging Face folder
vLLM loads, which the evaluation across stages and the report include. (Resuming from a checkpoint,
the reference recomputed for the remaining steps only, is tested on the loop alone, in
tests/unit/test_dpo_math.py: a second Ray Train start here would cost ~45 s.)"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from rlhf_ray.cli import main
from rlhf_ray.data.records import Message
from rlhf_ray.evaluate import generate_greedy
from rlhf_ray.modeling import load_policy
from rlhf_ray.run import read_metrics
from rlhf_ray.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]
TEST_CONFIG = REPO / "configs" / "test.yaml"
DPO = ["dpo.batch_size=8", "dpo.micro_batch_size=4", "dpo.eval_every=2", "dpo.checkpoint_every=2",
       "dpo.beta=0.1", "dpo.optim.lr=2e-4", "dpo.optim.warmup_steps=0", "dpo.precision=float32",
       "dpo.resources.num_workers=2", "dpo.resources.cpus_per_worker=0.5"]
VLLM_GREEDY = """
import json, sys
from pathlib import Path
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from rlhf_ray.config import KVCacheConfig
from rlhf_ray.memory import vllm_memory_args
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
          **vllm_memory_args(Path(sys.argv[1]), KVCacheConfig(), 1, "float32", 256))
prompt = json.loads(sys.argv[2])
out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(temperature=0, max_tokens=12))
print("GREEDY", json.dumps(list(out[0].outputs[0].token_ids)), flush=True)
"""


def dpo(runs: Path, pretrained: Path, steps: int) -> None:
    """`rlhf-ray dpo` on the test config, its base and SFT model the tiny policy."""
    overrides = [f"runs_dir={runs}", f"model.pretrained={pretrained}", f"dpo.steps={steps}", *DPO]
    main(["dpo", "--config", str(TEST_CONFIG), *[arg for o in overrides for arg in ("--set", o)]])


@pytest.fixture(scope="module", autouse=True)
def own_ray():
    """`main` starts Ray in this process; the modules after this one (test_jobs) need it gone."""
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_policy_dir) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_policy_dir, runs / "test" / "sft")  # what SFT would have left
    dpo(runs, tiny_policy_dir, steps=4)
    return runs / "test"


def test_dpo_trains_on_two_workers_from_the_runs_comparisons(run):
    rows = read_metrics(run / "metrics" / "dpo.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["workers"] == 2 for r in rows)
    # step 1 is measured before its update: the policy is the reference, every margin 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-3)
    for row in rows:
        assert 0 <= row["accuracy"] <= 1
        assert row["margin"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"], abs=1e-4)
    # each step's metrics are of its batch before its update: after the first, the policy
    # already prefers the chosen responses of comparisons it has not trained on yet
    assert sum(r["margin"] for r in rows[1:]) > 0 and all(r["grad_norm"] > 0 for r in rows)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval_accuracy", "eval_margin", "eval_chosen_reward", "eval_rejected_reward"} <= evals[-1].keys()
    assert list((run / "checkpoints" / "dpo").rglob("model.safetensors"))  # Ray Train kept them


def test_dpo_folder_is_a_model_transformers_and_vllm_load_alike(run):
    model = load_policy(run / "dpo")
    assert model.config.num_hidden_layers == 2
    tokenizer = load_tokenizer(run / "dpo")
    prompt = tokenizer.render_prompt([Message(role="user", content="What is the capital of France?")])
    ours = generate_greedy(run / "dpo", [prompt], 12, model=model)[0]
    done = subprocess.run([sys.executable, "-c", VLLM_GREEDY, str(run / "dpo"), json.dumps(prompt)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("GREEDY "))[7:])
    assert vllm[: len(ours)] == ours  # transformers stops at the end of turn; vLLM's ids include it


def test_the_evaluation_and_the_report_include_dpo(run):
    main(["eval", "--run", str(run)])
    result = json.loads((run / "eval" / "stages.json").read_text())
    names = [v["name"] for v in result["variants"]]
    assert names[-2:] == ["sft", "dpo"] and "rlhf" in result["skipped"]
    dpo = result["variants"][-1]
    assert 0 <= dpo["exact_match"] <= 1 and dpo["kl_to_sft"] > 0  # trained away from SFT
    assert "| dpo |" in (run / "eval" / "stages.md").read_text()
    main(["report", "--run", str(run)])
    report = (run / "report.md").read_text()
    assert "| dpo | 4 |" in report and "implicit reward margin" in report
    assert "| question | base continues | SFT | RLHF | DPO | reference |" in report
