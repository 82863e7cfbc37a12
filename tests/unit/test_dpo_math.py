"""DPO: its losses against hand computations, the preference data it reads, and its task on the
training loop alone (no Ray): the reference's log-probabilities computed once, the implicit-reward
metrics, and training that makes the chosen responses likelier than the rejected ones.

Expected values are worked out by hand (or by brute force over the pairs), not with the code under test.
"""

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data.records import ComparisonRecord
from rlhf_ray.modeling import load_policy
from rlhf_ray.run import read_metrics, steps_of
from rlhf_ray.tokenizer import load_tokenizer
from rlhf_ray.train.loop import Worker, train
from rlhf_ray.train.losses import IGNORE, dpo_loss, ranking_dpo_loss, ranking_pairs, sequence_logprobs
from rlhf_ray.train.stages import dpo_task, preference_groups
from rlhf_ray.train.tasks import DPOTask, epoch_order, worker_slice

TEST_CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def dpo_config(tmp_path: Path, **settings):
    """configs/test.yaml plus a dpo section (float32, so step 1 can be checked exactly)."""
    values = {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "checkpoint_every": 2,
              "precision": "float32", "optim.lr": 3e-3, "optim.warmup_steps": 0} | settings
    return load_config(TEST_CONFIG, [f"runs_dir={tmp_path}"] + [f"dpo.{k}={v}" for k, v in values.items()])


# --------------------------------------------------------------------------- the losses


def test_sigmoid_dpo_is_the_bradley_terry_likelihood_of_the_implicit_reward():
    # log pi/ref: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; margin h = 2; beta 0.5: -log sigmoid(1)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                    beta=0.5, variant="sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # 0.3133


def test_ipo_pulls_the_margin_to_one_over_two_beta():
    # the same h = 2; beta 0.5 puts the target at 1/(2 * 0.5) = 1: (2 - 1)^2
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    assert dpo_loss(*args, beta=0.5, variant="ipo").item() == pytest.approx(1.0)
    # beta 0.25: target 2, exactly the margin
    assert dpo_loss(*args, beta=0.25, variant="ipo").item() == pytest.approx(0.0)


def test_at_the_reference_sigmoid_is_log_two_and_ipo_the_squared_target():
    same = torch.tensor([-4.0, -7.5])
    assert dpo_loss(same, same - 1, same, same - 1, beta=0.1).tolist() == pytest.approx([math.log(2)] * 2)
    assert dpo_loss(same, same - 1, same, same - 1, beta=0.1, variant="ipo").tolist() == pytest.approx([25.0] * 2)


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.1, "hinge")


def test_the_sigmoid_gradient_raises_the_chosen_and_lowers_the_rejected():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1).sum().backward()
    # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h) = -0.05 at h = 0
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_a_ranking_gives_every_pair_best_first():
    assert ranking_pairs(2) == ([0], [1])
    assert ranking_pairs(3) == ([0, 0, 1], [1, 2, 2])
    assert list(zip(*ranking_pairs(4))) == list(combinations(range(4), 2))


@pytest.mark.parametrize("variant", ["sigmoid", "ipo"])
def test_a_rankings_loss_and_metrics_are_the_means_over_its_pairs(variant):
    beta = 0.5
    policy, reference = [-1.0, -4.0, -2.0], [-2.0, -2.0, -2.0]  # log pi/ref: 1, -2, 0
    loss, stats = ranking_dpo_loss(torch.tensor(policy), torch.tensor(reference), beta, variant)
    ratios = [p - r for p, r in zip(policy, reference)]
    pairs = [(0, 1), (0, 2), (1, 2)]  # margins h: 3, 1, -2
    per_pair = {"sigmoid": lambda h: -log_sigmoid(beta * h), "ipo": lambda h: (h - 1 / (2 * beta)) ** 2}[variant]
    assert loss.item() == pytest.approx(sum(per_pair(ratios[i] - ratios[j]) for i, j in pairs) / 3)
    # implicit rewards beta * log pi/ref: 0.5, -1, 0
    assert stats["chosen_reward"].item() == pytest.approx((0.5 + 0.5 - 1) / 3)
    assert stats["rejected_reward"].item() == pytest.approx((-1 + 0 + 0) / 3)
    assert stats["margin"].item() == pytest.approx((1.5 + 0.5 - 1) / 3)
    assert stats["accuracy"].item() == pytest.approx(2 / 3)  # the pair (1, 2) is ordered wrong


def test_sequence_logprobs_sum_the_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[3, IGNORE, 1, IGNORE], [IGNORE, IGNORE, IGNORE, 4]])
    brute = [sum(torch.log_softmax(logits[b, t], -1)[labels[b, t]].item()
                 for t in range(4) if labels[b, t] != IGNORE) for b in range(2)]
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx(brute, rel=1e-5)


# --------------------------------------------------------------------------- the data


def comparison(prompt: list[tuple[str, str]], *responses: str) -> ComparisonRecord:
    return ComparisonRecord(prompt=[{"role": r, "content": c} for r, c in prompt],
                            responses=[[{"role": "assistant", "content": t}] for t in responses])


FRANCE = comparison([("user", "What is the capital of France?")], "Paris.", "Lima.")
JAPAN = comparison([("user", "Capital of Japan?"), ("assistant", "Tokyo."), ("user", "And of Peru?")],
                   "Lima.", "Nairobi.", "The capital of Peru is Tokyo.")
KENYA = comparison([("user", "Where is Nairobi?")], "The capital of Kenya is Nairobi.", "Paris.")
PERU = comparison([("user", "The capital of Peru?")], "The capital of Peru is Lima.", "Tokyo.")


def test_the_mask_covers_the_responses_turn_and_not_the_prompts_own_assistant_turn(tiny_policy_dir):
    tokenizer = load_tokenizer(tiny_policy_dir)
    groups = preference_groups([FRANCE, JAPAN], tokenizer, max_len=128)
    assert [len(g) for g in groups] == [2, 3]
    for record, group in zip([FRANCE, JAPAN], groups):
        for example, response in zip(group, record.responses):
            masked = [int(i) for i, m in zip(example.ids, example.mask) if m]
            # the response's words and its end of turn, nothing of the prompt (Tokyo. included)
            assert tokenizer.decode(masked[:-1]) == response[0].content
            assert masked[-1] == tokenizer.end_id


# --------------------------------------------------------------------------- the task on the loop


@pytest.fixture
def task(tmp_path, tiny_policy_dir) -> DPOTask:
    cfg = dpo_config(tmp_path, steps=6, beta=0.5)
    tokenizer = load_tokenizer(tiny_policy_dir)
    return DPOTask(cfg, preference_groups([FRANCE, JAPAN, KENYA, PERU], tokenizer, 128),
                   preference_groups([FRANCE, KENYA], tokenizer, 128),
                   init_dir=tiny_policy_dir, out_dir=tmp_path / "dpo")


def test_prepare_computes_the_reference_of_exactly_the_comparisons_this_worker_will_see(task):
    task.prepare(torch.device("cpu"), start_step=2, rank=1, world=2)
    seen = {i for step in range(2, 6) for i in worker_slice(epoch_order(4, 4, step, 0), 1, 2)}
    assert set(task.reference) == seen
    reference = load_policy(task.init_dir).eval()
    for i in seen:  # each response alone, under the sft/ model: the same log-probabilities
        for example, logprob in zip(task.groups[i], task.reference[i]):
            ids = torch.tensor(example.ids, dtype=torch.long)[None]
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], -1)
            targets = [(t, int(ids[0, t + 1])) for t in range(ids.shape[1] - 1) if example.mask[t + 1]]
            assert logprob.item() == pytest.approx(sum(logp[t, k].item() for t, k in targets), rel=1e-4)


def test_micro_batches_without_the_reference_are_refused(task):
    with pytest.raises(RuntimeError, match="prepare must compute the reference"):
        task.micro_batches(0, 0, 1)


def test_dpo_on_the_loop_starts_at_log_two_and_learns_the_preferences(task, tmp_path):
    metrics_path = tmp_path / "metrics" / "dpo.jsonl"
    train(task, Worker(metrics_path=metrics_path))
    rows = read_metrics(metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    first, last = rows[0], rows[-1]
    # step 1's loss is measured before its update, with the policy equal to the reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["margin"] == pytest.approx(0.0, abs=1e-4) and first["chosen_reward"] == pytest.approx(0.0, abs=1e-4)
    for key in ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "lr", "grad_norm",
                "tokens_per_s", "eval_loss", "eval_margin", "eval_accuracy", "eval_chosen_reward",
                "eval_rejected_reward"):
        assert key in last, key
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert last["loss"] < first["loss"] and last["margin"] > 0.5 and last["eval_accuracy"] == 1.0
    assert last["margin"] == pytest.approx(last["chosen_reward"] - last["rejected_reward"], abs=1e-5)
    load_policy(tmp_path / "dpo")  # exported as a Hugging Face folder


def test_a_resumed_dpo_run_recomputes_the_reference_for_its_remaining_steps_only(task, tmp_path):
    metrics_path = tmp_path / "metrics" / "dpo.jsonl"
    saved = tmp_path / "checkpoint-4"

    def keep_step_4(metrics, checkpoint):
        if metrics["step"] == 4:
            shutil.copytree(checkpoint, saved)  # what Ray Train does with a reported checkpoint

    train(task, Worker(metrics_path=metrics_path, report=keep_step_4))
    uninterrupted = read_metrics(metrics_path)
    resumed = replace(task, out_dir=tmp_path / "resumed")  # a new task, as a restarted worker has
    train(resumed, Worker(metrics_path=metrics_path, resume_from=lambda: nullcontext(saved)))
    assert set(resumed.reference) == {i for step in (4, 5) for i in epoch_order(4, 4, step, 0)}
    rows = read_metrics(metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[4]["resumed_from"] == 4
    for mine, theirs in zip(rows[4:], uninterrupted[4:]):  # steps 5 and 6, as if never interrupted
        assert mine.keys() == theirs.keys()
        for key in {"loss", "margin", "accuracy", "eval_loss", "eval_margin"} & theirs.keys():
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    expected, actual = load_file(task.out_dir / "model.safetensors"), load_file(resumed.out_dir / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- config and refusals


def test_dpo_runs_only_when_configured():
    cfg = load_config(TEST_CONFIG)
    assert cfg.dpo is None
    with pytest.raises(ValueError, match="stage 'dpo' is not configured: add a `dpo:` section"):
        steps_of(cfg, "dpo")
    with pytest.raises(ValueError, match="dpo is not configured"):
        dpo_task(cfg, {"reward": [], "reward_eval": []})
    cfg = load_config(TEST_CONFIG, ["dpo.steps=7"])
    assert steps_of(cfg, "dpo") == 7 and cfg.dpo.beta == 0.1 and cfg.dpo.loss == "sigmoid"


@pytest.mark.parametrize("setting, message", [
    ("dpo.beta=0", "dpo.beta: Input should be greater than 0 (got 0)"),
    ("dpo.beta=-0.1", "dpo.beta: Input should be greater than 0 (got -0.1)"),
    ("dpo.loss=hinge", "dpo.loss: Input should be 'sigmoid' or 'ipo' (got 'hinge')"),
])
def test_a_bad_setting_is_named_with_its_value(setting, message):
    with pytest.raises(ConfigError) as e:
        load_config(TEST_CONFIG, [setting])
    assert f"override {setting!r}: {message}" in str(e.value)


def test_dpo_without_comparisons_names_the_files(tmp_path, tiny_policy_dir):
    cfg = dpo_config(tmp_path)
    sft = cfg.run_dir / "sft"
    sft.parent.mkdir(parents=True)
    sft.symlink_to(tiny_policy_dir)
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty}: no records \\(the file is empty\\)"):
        dpo_task(cfg, {"reward": [empty], "reward_eval": []})
    with pytest.raises(ValueError, match=r"dpo trains on comparisons, but there are none \(data.reward: no files\)"):
        dpo_task(cfg, {"reward": [], "reward_eval": []})
    (tmp_path / "one.jsonl").write_text(json.dumps({"prompt": "Hi", "chosen": "Paris.", "rejected": "Lima."}))
    assert len(dpo_task(cfg, {"reward": [tmp_path / "one.jsonl"], "reward_eval": []}).groups) == 1


def test_dpo_without_sft_says_which_stage_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dpo starts from .*sft.*run `rlhf-ray sft`"):
        dpo_task(dpo_config(tmp_path), {"reward": [], "reward_eval": []})
