"""The run's report renders the metrics and the evaluation across stages; it generates nothing,
so its sample replies are exactly the evaluation's."""

import json

from rlhf_ray.config import validate_config
from rlhf_ray.report import write_report
from rlhf_ray.run import RunFolder, append_metrics
from rlhf_ray.storage import write_json_atomic, write_text_atomic


def sample(question: str, reply: str, reference: str) -> dict:
    return {"question": question, "reply": reply, "reference": reference}


QUESTIONS = [("What is the capital of Peru?", "Lima"), ("Capital of Kenya?", "Nairobi"),
             ("Where is Japan?", "Asia")]


def variant(name: str, replies: list[str], exact_match: float) -> dict:
    return {"name": name, "exact_match": exact_match, "count": 40,
            "samples": [sample(q, r, ref) for (q, ref), r in zip(QUESTIONS, replies)]}


def make_run(tmp_path):
    cfg = validate_config({"name": "r", "runs_dir": str(tmp_path), "data": {"demo": None}})
    run = RunFolder(cfg.run_dir)
    for step, loss in enumerate([3.0, 2.5, 2.0], 1):
        append_metrics(run.metrics("pretrain"), {"step": step, "loss": loss})
    append_metrics(run.metrics("reward"), {"step": 1, "loss": 0.7, "eval_loss": 0.6,
                                           "eval_accuracy": 0.75})
    append_metrics(run.metrics("ppo"), {"step": 0, "eval_reward_greedy": 0.1, "eval_reward_sampled": 0.0,
                                        "eval_kl": 0.0, "eval_exact_match": 0.2})
    append_metrics(run.metrics("ppo"), {"step": 4, "eval_reward_greedy": 0.6, "eval_reward_sampled": 0.4,
                                        "eval_kl": 0.3, "eval_exact_match": 0.5})
    return cfg, run


def test_the_report_shows_each_stage_and_the_evaluations_replies_side_by_side(tmp_path):
    cfg, run = make_run(tmp_path)
    write_json_atomic(run.eval / "stages.json", {"variants": [
        variant("base 0-shot", ["What is the capital of Chile?", "", "Japan | is"], 0.0),
        variant("sft", ["Lima.", "Nairobi.", "In Asia."], 0.5),
        variant("rlhf", ["The capital is Lima.", "Nairobi.", "Asia."], 0.6)]})
    write_text_atomic(run.eval / "stages.md", "# title\n\n| model | exact match |\n\n![stages](stages.png)\n")
    report = write_report(cfg).read_text()
    assert "| pretrain | 3 | 3.000 → 2.000 | – |  |" in report
    assert "| reward | 1 | 0.700 → 0.700 | 0.600 | held-out pairwise accuracy 0.750 |" in report
    assert ("| ppo | 4 | reward (greedy, held-out) 0.100 → 0.600 | – | sampled reward 0.000 → 0.400, "
            "KL 0.300, exact match 20% → 50% |") in report
    table = report.split("| question | base continues | SFT | RLHF | reference |\n|---|---|---|---|---|\n")[1]
    assert table.splitlines()[:3] == [
        "| What is the capital of Peru? | What is the capital of Chile? | Lima. | The capital is Lima. | Lima |",
        "| Capital of Kenya? | ∅ | Nairobi. | Nairobi. | Nairobi |",
        "| Where is Japan? | Japan \\| is | In Asia. | Asia. | Asia |"]
    assert "Exact match on all held-out questions: sft 50% of 40, rlhf 60% of 40." in report
    assert "## Evaluation across stages" in report and "![stages](eval/stages.png)" in report
    assert (run.plots / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run.root.rglob(".*tmp*"))  # written atomically: no temporary left


def test_without_an_evaluation_the_report_says_how_to_make_one(tmp_path):
    cfg, run = make_run(tmp_path)
    report = write_report(cfg).read_text()
    assert f"No evaluation yet: `rlhf-ray eval --run {run.root}` writes it." in report
    assert json.loads(run.metrics("ppo").read_text().splitlines()[-1])["step"] == 4


def test_a_run_with_dpo_reports_it_next_to_ppo(tmp_path):
    _, run = make_run(tmp_path)
    cfg = validate_config({"name": "r", "runs_dir": str(tmp_path), "data": {"demo": None}, "dpo": {"steps": 2}})
    append_metrics(run.metrics("dpo"), {"step": 1, "loss": 0.69, "margin": 0.0})
    append_metrics(run.metrics("dpo"), {"step": 2, "loss": 0.5, "margin": 0.4, "eval_loss": 0.55,
                                        "eval_accuracy": 0.8, "eval_margin": 0.35})
    write_json_atomic(run.eval / "stages.json", {"variants": [
        variant("base 0-shot", ["What is the capital of Chile?", "", "Japan"], 0.0),
        variant("sft", ["Lima.", "Nairobi.", "In Asia."], 0.5),
        variant("rlhf", ["The capital is Lima.", "Nairobi.", "Asia."], 0.6) | {"reward": 0.2, "kl_to_sft": 0.1},
        variant("dpo", ["Lima is the capital.", "Nairobi.", "Asia."], 0.7) | {"reward": 0.3, "kl_to_sft": 0.4}]})
    write_text_atomic(run.eval / "stages.md", "# title\n")
    report = write_report(cfg).read_text()
    assert ("| dpo | 2 | 0.690 → 0.500 | 0.550 | held-out pairwise accuracy 0.800, implicit reward margin "
            "0.350 |") in report
    table = report.split("| question | base continues | SFT | RLHF | DPO | reference |\n|---|---|---|---|---|---|\n")[1]
    assert table.splitlines()[0] == ("| What is the capital of Peru? | What is the capital of Chile? | Lima. | "
                                     "The capital is Lima. | Lima is the capital. | Lima |")
    assert "sft 50% of 40, rlhf 60% of 40, dpo 70% of 40." in report
    section = report.split("## PPO and DPO from the same comparisons")[1]
    # the reward model's held-out accuracy (0.75) for PPO, DPO's own (0.80) for DPO
    assert "| rlhf | 0.750 | 0.600 | 0.200 | 0.100 | – |" in section
    assert "| dpo | 0.800 | 0.700 | 0.300 | 0.400 | – |" in section


def test_a_run_without_dpo_has_no_dpo_row_column_or_section(tmp_path):
    cfg, run = make_run(tmp_path)
    write_json_atomic(run.eval / "stages.json", {"variants": [variant("sft", ["Lima.", "Nairobi.", "Asia."], 0.5)]})
    write_text_atomic(run.eval / "stages.md", "# title\n")
    report = write_report(cfg).read_text()
    assert "| dpo |" not in report and "DPO" not in report
