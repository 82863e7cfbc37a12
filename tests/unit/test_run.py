"""The stage registry owns the run folder: every stage's name, folder, metrics file and what it
needs are spelled once, in rlhf_ray/run.py, and everything else asks it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.cli import build_parser
from rlhf_ray.run import (
    CHAT_MODELS,
    MODELS,
    REWARD_MODEL,
    STAGES,
    RunFolder,
    serves_as,
    stage,
    stages_until,
)

REPO = Path(__file__).parents[2]
NAMES = [s.name for s in STAGES]


def test_the_chain_in_order():
    assert NAMES == ["data", "tokenizer", "pretrain", "sft", "compare-data", "reward", "ppo",
                     "dpo", "eval", "report"]
    assert CHAT_MODELS == ("base", "sft", "rlhf", "dpo") and REWARD_MODEL == "reward"
    assert MODELS == ("base", "sft", "rlhf", "dpo", "reward")
    assert [serves_as(m) for m in CHAT_MODELS] == ["document", "chat", "chat", "chat"]


def test_every_stage_resolves_to_its_work_and_builds_on_earlier_stages():
    for i, this in enumerate(STAGES):
        assert callable(this.work()) and callable(this.work(alone=True))
        earlier = NAMES[:i]
        assert set(this.needs) <= set(earlier) and set(this.first) <= set(earlier), this.name
    assert len({s.folder for s in STAGES}) == len(STAGES)  # no two stages share a folder


def test_a_run_folder_names_each_stage_output():
    run = RunFolder(Path("/runs/demo"))
    assert run.output("ppo") == Path("/runs/demo/rlhf") and run.model("rlhf") == run.output("ppo")
    assert run.metrics("reward") == Path("/runs/demo/metrics/reward.jsonl")
    assert run.eval == Path("/runs/demo/eval") and run.report == Path("/runs/demo/report.md")
    assert run.demo_file("rl_eval") == Path("/runs/demo/data/rl_eval.jsonl")
    assert [s.name for s in stages_until("sft")] == NAMES[:4]


def test_unknown_names_are_refused_listing_the_known_ones():
    with pytest.raises(ValueError, match="'kto' is not a stage; the stages are data, tokenizer"):
        stage("kto")
    with pytest.raises(ValueError, match="stage 'data' writes no metrics"):
        RunFolder(Path("r")).metrics("data")
    with pytest.raises(ValueError, match="'critic' is not a model of a run; they are base, sft"):
        RunFolder(Path("r")).model("critic")


def test_the_cli_and_the_jobs_offer_every_stage():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(NAMES) <= set(commands)
    for this in STAGES:  # a stage of a finished run takes --run; the others a config
        flag = "--run" if this.on_run else "--config"
        assert flag in commands[this.name].format_usage(), this.name
    until = next(a for a in commands["pipeline"]._actions if a.dest == "until")
    assert until.choices == NAMES and until.default == "report"
    usage = subprocess.run([sys.executable, "jobs/stage.py", "--help"], cwd=REPO, text=True,
                           capture_output=True, check=True).stdout
    assert "{" + ",".join(NAMES) + "}" in usage


# A run folder's own paths: a folder of the run joined to a root, or a metrics file.
RUN_PATH = re.compile(r'/ *"(base|sft|rlhf|reward|eval|compare|tokenizer|checkpoints|metrics|data|'
                      r'plots|tokens|config\.yaml|report\.md)"|"metrics/|f"\{[a-z_]+\}\.jsonl"')


def test_a_stage_folder_or_metrics_file_is_spelled_in_one_module():
    spelled = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
               for folder in ("rlhf_ray", "serve", "jobs")
               for path in sorted((REPO / folder).rglob("*.py")) if path != REPO / "rlhf_ray" / "run.py"
               for n, line in enumerate(path.read_text().splitlines(), 1) if RUN_PATH.search(line)]
    assert spelled == []


def test_the_chat_page_offers_every_chat_model():
    page = (REPO / "serve" / "page.html").read_text()
    assert f"const CHAT_MODELS = {json.dumps(list(CHAT_MODELS))};" in page


def test_printing_the_resolved_config_imports_no_training_stack():
    """`rlhf-ray config` is a quick look at a config: it must not pay for torch, Ray or vLLM."""
    check = ("import sys; from rlhf_ray.cli import main; "
             "main(['config', '--config', 'configs/test.yaml', '--set', 'seed=7']); "
             "heavy = sorted({'torch', 'ray', 'vllm', 'transformers'} & set(sys.modules)); "
             "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "seed: 7" in out.stdout
