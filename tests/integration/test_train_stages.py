"""Stages 1–3a on real Ray Train: two DDP workers, checkpoints, restarts, clear refusals."""

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.cli import main
from rlhf_ray.compare.store import ComparisonStore
from rlhf_ray.data.readers import read_records
from rlhf_ray.data.records import ComparisonRecord, PromptRecord
from rlhf_ray.train.stages import reward_task
from rlhf_ray.config import load_config
from rlhf_ray.modeling import likelihood_weight_of, load_policy, load_scalar_model
from rlhf_ray.pipeline import make_demo_data, make_tokenizer, prepare_run, reward_files, train_model

pytestmark = pytest.mark.integration

TEST_CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "workers"}
# The pipeline also collects comparisons: 3 SFT samples per prompt, ranked by a labeler function.
COMPARE = ["--set", "compare.labeler=tests.tiny:shorter_first", "--set", "compare.samples_per_prompt=3"]


def metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics" / f"{stage}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    main(["pipeline", "--config", str(TEST_CONFIG), "--set", f"runs_dir={runs}", *COMPARE])
    return runs / "test"


def test_the_three_stages_train_on_two_workers_and_export_hf_folders(run):
    cfg = load_config(TEST_CONFIG)
    for stage in ("pretrain", "sft", "reward"):
        lines = metrics(run, stage)
        assert [m["step"] for m in lines] == list(range(1, getattr(cfg, stage).steps + 1))
        assert all(METRIC_KEYS <= m.keys() and m["workers"] == 2 for m in lines)
        assert "eval_loss" in lines[-1]
    assert "eval_accuracy" in metrics(run, "reward")[-1]
    load_policy(run / "base")
    load_policy(run / "sft")
    reward = load_scalar_model(run / "reward")
    assert reward.config.num_labels == 1 and likelihood_weight_of(reward) == cfg.reward.likelihood_weight == 1.0
    assert cfg.reward.likelihood_gate and reward.likelihood_gate.weight.abs().sum() > 0  # the gate trained


def test_sft_starts_from_base_and_reward_from_sft(run):
    base = load_file(run / "base" / "model.safetensors")
    sft = load_file(run / "sft" / "model.safetensors")
    reward = load_file(run / "reward" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(base[name], sft[name])  # SFT trained it further
    assert not torch.equal(sft[name], reward[name])
    assert set(reward) - set(sft) == {"score.weight"}  # a plain sequence-classification checkpoint,
    table = "model.embed_tokens.weight"  # configs/test.yaml freezes it: sft/'s, trained on two DDP workers
    assert load_config(TEST_CONFIG).reward.freeze_embeddings and torch.equal(sft[table], reward[table])
    assert set(load_file(run / "reward" / "likelihood_gate.safetensors")) == {"weight", "bias"}  # the gate apart


def test_the_reward_model_trains_under_fsdp_with_its_token_table_frozen_and_its_gate(run, tmp_path):
    """configs/test.yaml's reward model (frozen token table, likelihood gate) sharded over two
    workers instead of replicated: the table stays sft/'s, the gate trains and is saved apart."""
    test_run = tmp_path / "test"
    for name in ("data", "tokenizer", "base", "sft", "compare"):
        shutil.copytree(run / name, test_run / name)
    cfg = load_config(TEST_CONFIG, [f"runs_dir={tmp_path}", "reward.strategy=fsdp", "reward.steps=3",
                                    "reward.eval_every=3", *COMPARE[1::2]])
    prepare_run(cfg)
    train_model(cfg, "reward")
    assert [m["workers"] for m in metrics(test_run, "reward")] == [2] * 3
    sft = load_file(test_run / "sft" / "model.safetensors")
    reward = load_file(test_run / "reward" / "model.safetensors")
    assert set(reward) - set(sft) == {"score.weight"}
    assert torch.equal(sft["model.embed_tokens.weight"], reward["model.embed_tokens.weight"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(sft[name], reward[name])
    assert load_scalar_model(test_run / "reward").likelihood_gate.weight.abs().sum() > 0


def test_sft_samples_ranked_by_a_labeler_function_become_reward_data(run):
    store = ComparisonStore(run / "compare")
    candidates = store.candidates()
    prompts = read_records(run / "data" / "compare.jsonl", PromptRecord)
    assert 0 < len(candidates) <= len(prompts)
    for candidate in candidates.values():  # K = 3 samples, identical ones merged
        assert 2 <= len(candidate.responses) <= 3 and len(set(candidate.responses)) == len(candidate.responses)
    rankings = read_records(store.rankings_path, ComparisonRecord)
    assert len(rankings) > 0
    for ranking in rankings:
        texts = [r[0].content for r in ranking.responses]
        assert set(texts) <= set(candidates[ranking.id].responses)
        assert [len(t) for t in texts] == sorted({len(t) for t in texts})  # shorter first, ties dropped
        assert ranking.labeler == "labeler:tests.tiny:shorter_first" and ranking.time
    # The reward model trained on them next to the demo's comparisons.
    cfg = load_config(TEST_CONFIG, [f"runs_dir={run.parent}", *COMPARE[1::2]])
    files = reward_files(cfg)
    assert files["reward"][-1] == store.rankings_path
    templates = read_records(run / "data" / "reward.jsonl", ComparisonRecord)
    assert len(reward_task(cfg, files).groups) == len(templates) + len(rankings)


def test_the_pipeline_evaluates_every_stage_and_reports_it(run):
    result = json.loads((run / "eval" / "stages.json").read_text())
    names = [v["name"] for v in result["variants"]]
    assert names == ["base 0-shot", "base 1-shot", "base 3-shot", "base 5-shot", "sft", "rlhf"]
    assert all(0 <= v["exact_match"] <= 1 and isinstance(v["reward"], float) for v in result["variants"])
    wins = result["win_rates"]["rlhf"]  # evaluation.labeler: demo judged RLHF against SFT
    assert wins["wins"] + wins["ties"] + wins["losses"] == result["questions"]
    assert set(result["fault_rates"]) == set(names) and 0 < result["reward_model"]["pairs"]
    report = (run / "report.md").read_text()
    assert "win rate vs sft" in report and "pairwise accuracy" in report and "Calibration" in report
    assert "| reward |" in report and "held-out pairwise accuracy" in report
    assert "| question | base continues | SFT | RLHF | reference |" in report


def test_a_rerun_skips_every_finished_stage(run, capsys):
    before = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    main(["pipeline", "--config", str(TEST_CONFIG), "--set", f"runs_dir={run.parent}", *COMPARE])
    out = capsys.readouterr().out
    for folder in ("base", "sft", "reward"):
        assert f"{run / folder} exists, skipped" in out
    assert "is newer than every model, skipped" in out  # the evaluation is not redone
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == before


def test_more_workers_than_the_cluster_has_is_refused_before_starting(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(TEST_CONFIG), "--set", f"runs_dir={tmp_path}",
              "--set", "pretrain.resources.num_workers=64", "--set", "pretrain.batch_size=64"])
    err = capsys.readouterr().err
    assert "pretrain.resources asks for 32 CPUs (64 workers x 0.5) but the cluster has" in err
    assert not (tmp_path / "test" / "base").exists() and not (tmp_path / "test" / "checkpoints").exists()


def test_sft_without_a_base_model_names_the_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(TEST_CONFIG), "--set", f"runs_dir={tmp_path}"])
    assert f"sft starts from {tmp_path / 'test' / 'base'}, which is not usable" in capsys.readouterr().err


def test_a_conversation_longer_than_the_context_is_named(run, tmp_path, capsys):
    sft = tmp_path / "long.jsonl"
    turn = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 600}]}
    sft.write_text(json.dumps(turn) + "\n")
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(TEST_CONFIG), "--set", f"runs_dir={tmp_path}", "--set", f"data.sft=[{sft}]",
              "--set", f"model.pretrained={run / 'base'}"])
    err = capsys.readouterr().err
    assert f"{sft}:1: the conversation is" in err and "longer than model.max_seq_len = 512" in err
    assert not (tmp_path / "test" / "sft").exists()


def _train_pretrain(runs: Path, steps: int, overrides: list[str] = ()) -> Path:
    cfg = load_config(TEST_CONFIG, [f"runs_dir={runs}", f"pretrain.steps={steps}", "pretrain.checkpoint_every=10",
                                    "pretrain.eval_every=1000", *overrides])
    prepare_run(cfg)
    make_demo_data(cfg)
    make_tokenizer(cfg)
    train_model(cfg, "pretrain")
    return cfg.run_dir


def _cmdline(process: psutil.Process) -> list[str]:
    """A child's command line; empty for one that exited since it was listed (Ray starts and
    ends helper processes all the time)."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _kill_a_worker_after(metrics_path: Path, step: int, training_done: threading.Event,
                         timeout: float = 1800) -> str:
    """Kill a Ray Train worker once the run's metrics reach `step`; waits on the run itself (a
    slow machine only takes longer), the deadline only guards against a hung run."""
    deadline = time.time() + timeout
    steps = 0
    while time.time() < deadline and not training_done.is_set():
        steps = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0
        if steps >= step:
            # Only this test's Ray (started by this process) counts: other Ray runs may share the machine.
            workers = [p for p in psutil.Process().children(recursive=True)
                       if "RayTrainWorker" in " ".join(_cmdline(p))]
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                return f"killed {workers[-1].pid} after step {steps}"
        time.sleep(0.01)
    why = "training finished first" if training_done.is_set() else f"no step {step} after {timeout:g} s"
    return f"no worker killed: {why} ({steps} lines in {metrics_path})"


def test_a_killed_worker_resumes_from_the_last_checkpoint_losing_and_repeating_nothing(tmp_path):
    steps = 150  # enough that the kill after step 45 lands mid-run
    killer_result: list[str] = []
    metrics_path = tmp_path / "killed" / "test" / "metrics" / "pretrain.jsonl"
    done = threading.Event()
    def kill() -> None:
        try:
            killer_result.append(_kill_a_worker_after(metrics_path, 45, done))
        except Exception as e:  # reported by the assertion below, not lost in the thread
            killer_result.append(f"the killer failed: {e!r}")

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        killed = _train_pretrain(tmp_path / "killed", steps)
    finally:
        done.set()
        killer.join()
    assert killer_result[0].startswith("killed"), killer_result[0]

    lines = metrics(killed, "pretrain")
    assert [m["step"] for m in lines] == list(range(1, steps + 1))  # every step once, in order
    resumed = {m["resumed_from"] for m in lines} - {0}
    assert len(resumed) == 1, "exactly one restart"
    checkpoint_step = resumed.pop()
    # Killed just after step 45: the newest checkpoint Ray Train had registered by then (every 10 steps).
    assert checkpoint_step % 10 == 0 and 0 < checkpoint_step <= 50
    assert all(m["resumed_from"] == (0 if m["step"] <= checkpoint_step else checkpoint_step) for m in lines)

    clean = _train_pretrain(tmp_path / "clean", steps)
    after_kill = load_file(killed / "base" / "model.safetensors")
    uninterrupted = load_file(clean / "base" / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(after_kill[name], tensor, rtol=0, atol=0, msg=name)


def test_fsdp_shards_over_two_workers_exports_a_plain_folder_and_resumes(tmp_path):
    fsdp = ["pretrain.strategy=fsdp", "pretrain.checkpoint_every=2"]
    run = _train_pretrain(tmp_path, 4, fsdp)
    assert load_policy(run / "base").config.num_hidden_layers == 2
    first = metrics(run, "pretrain")
    assert [m["workers"] for m in first] == [2] * 4 and first[-1]["loss"] < first[0]["loss"]

    shutil.rmtree(run / "base")  # ask for more steps: the run continues from its step-4 checkpoint
    _train_pretrain(tmp_path, 6, fsdp)
    lines = metrics(run, "pretrain")
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert [m["resumed_from"] for m in lines] == [0, 0, 0, 0, 4, 4]
    load_policy(run / "base")
