"""The training loop on its own (no Ray): what SFT and reward training learn from, the metrics and
model a run writes, and resuming from a checkpoint as if the lost steps had never happened."""

import json
import math
import re
import shutil
from contextlib import nullcontext
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rlhf_ray.config import Optim, load_config
from rlhf_ray.data.readers import RecordError, read_records
from rlhf_ray.data.records import ChatRecord
from rlhf_ray.modeling import check_model_folder, load_policy, load_scalar_model, new_policy
from rlhf_ray.run import keep_metrics_before
from rlhf_ray.tokenizer import END, load_tokenizer
from rlhf_ray.train.loop import (
    Worker,
    load_checkpoint,
    save_checkpoint,
    train,
)
from rlhf_ray.train.losses import IGNORE, lm_loss
from rlhf_ray.train.optim import lr_at, make_optimizer
from rlhf_ray.train.stages import chat_examples
from rlhf_ray.train.tasks import ChatExample, RewardTask, SFTTask, epoch_order, worker_slice
from tests.tiny import TINY_MODEL

TEST_CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"

CONVERSATIONS = [
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
    [("system", "Answer briefly."), ("user", "Capital of Japan?"), ("assistant", "Tokyo."),
     ("user", "And of Peru?"), ("assistant", "Lima is the capital of Peru.")],
    [("user", "Where is Nairobi?"), ("assistant", "The capital of Kenya is Nairobi.")],
    [("user", "Ça va?"), ("assistant", "Ça va 🙂")],
]


def chat_record(turns: list[tuple[str, str]]) -> ChatRecord:
    return ChatRecord(messages=[{"role": role, "content": content} for role, content in turns])


def bt(difference: float) -> float:
    """-log sigmoid(d), by hand."""
    return math.log1p(math.exp(-difference))


def run_config(tmp_path: Path, stage: str = "sft", **settings):
    """configs/test.yaml with this test's runs_dir and a few small, fast stage settings; float32, so
    that steps can be checked against losses computed here without autocast."""
    values = {"steps": 4, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "precision": "float32",
              "checkpoint_every": 2, "optim.lr": 3e-3, "optim.warmup_steps": 0} | settings
    overrides = [f"runs_dir={tmp_path}"] + [f"{stage}.{key}={value}" for key, value in values.items()]
    return load_config(TEST_CONFIG, overrides)


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_dir):
    return load_tokenizer(tiny_policy_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return chat_examples([chat_record(c) for c in CONVERSATIONS], tokenizer, max_len=128)


# --------------------------------------------------------------------------- SFT data


def test_sft_labels_exactly_the_assistant_replies_and_their_end_of_turn(tmp_path, tiny_policy_dir,
                                                                        tokenizer, examples):
    cfg = run_config(tmp_path, batch_size=3, micro_batch_size=3)
    task = SFTTask(cfg, examples[:3], [], init_dir=tiny_policy_dir, out_dir=tmp_path / "sft")
    [batch] = task.micro_batches(step=0, rank=0, world=1)
    order = epoch_order(3, 3, 0, cfg.seed)
    assert batch["input_ids"].shape[0] == 3
    for row, index in enumerate(order):
        replies = [content for role, content in CONVERSATIONS[index] if role == "assistant"]
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        labelled = labels != IGNORE
        targets = labels[labelled].tolist()
        assert tokenizer.decode(targets) == "".join(reply + END for reply in replies)
        assert targets == [t for reply in replies for t in tokenizer.encode(reply) + [tokenizer.end_id]]
        # each labelled position predicts the next input token; padding and the last position never
        assert torch.equal(labels[:-1][labelled[:-1]], ids[1:][labelled[:-1]])
        assert not labelled[-1]
        assert not labelled[batch["attention_mask"][row] == 0].any()


def test_changing_a_user_token_does_not_change_what_is_labelled(tmp_path, tiny_policy_dir, examples):
    cfg = run_config(tmp_path)
    task = SFTTask(cfg, examples, [], init_dir=tiny_policy_dir, out_dir=tmp_path / "sft")
    example = examples[0]
    user_position = 3  # <|endoftext|> <|user|> then the user's words
    assert example.mask[user_position] == 0
    changed = replace(example, ids=example.ids.copy())
    changed.ids[user_position] = (example.ids[user_position] + 1) % 256
    original, edited = task._batch([example])["labels"], task._batch([changed])["labels"]
    assert torch.equal(original, edited)


def test_a_conversation_longer_than_the_context_is_refused_naming_its_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    long = {"prompt": "Capital of France?", "completion": "Paris. " * 40}
    path.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    records = read_records(path, ChatRecord)
    limit = len(tokenizer.render_chat(records[0].messages)[0])
    assert len(chat_examples(records[:1], tokenizer, limit)) == 1  # exactly the limit fits
    with pytest.raises(RecordError) as error:
        chat_examples(records, tokenizer, limit)
    assert len(error.value.problems) == 1
    assert str(error.value).startswith(f"{path}:2: the conversation is ")
    assert f"longer than model.max_seq_len = {limit}" in str(error.value)


# --------------------------------------------------------------------------- reward data and loss


class LastTokenReward(torch.nn.Module):
    """A scalar model in plain torch whose reward of a sequence is the id of its last real token:
    each token's final hidden state is its id, and the score head multiplies it by one."""

    def __init__(self) -> None:
        super().__init__()
        self.score = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.ones_(self.score.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                output_hidden_states: bool = False) -> SimpleNamespace:
        return SimpleNamespace(hidden_states=[input_ids.float()[..., None]])


def seq(*ids: int) -> np.ndarray:
    return np.array([0, *ids], dtype=np.int32)


def as_examples(groups: list[list[np.ndarray]]) -> list[list[ChatExample]]:
    """Comparisons of token ids as the reward task takes them: all but the first token the response."""
    return [[ChatExample(ids=s, mask=np.array([0] + [1] * (len(s) - 1), dtype=np.int8)) for s in g]
            for g in groups]


def test_reward_loss_of_a_comparison_is_the_mean_of_its_pairs_and_counts_once(tmp_path, tiny_policy_dir):
    cfg = run_config(tmp_path, "reward")
    groups = [[seq(5), seq(9, 3), seq(1)], [seq(2), seq(6)]]
    task = RewardTask(cfg, as_examples(groups), [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    loss, count = task.loss(LastTokenReward(), task._batch(as_examples(groups)))
    # rewards 5, 3, 1: pairs differ by 2, 4, 2; rewards 2, 6: the better one scores 4 less
    assert loss.item() == pytest.approx((bt(2) + bt(4) + bt(2)) / 3 + bt(-4))
    assert int(count) == 2


def test_reward_loss_of_the_tiny_model_matches_its_scores_by_hand(tmp_path, tiny_policy_dir, tokenizer):
    cfg = run_config(tmp_path, "reward", likelihood_weight=0.0, lm_loss_weight=0.0,
                     likelihood_gate=False)  # the head alone
    group = [np.array(tokenizer.encode_document(text), dtype=np.int32)
             for text in ("The capital of France is Paris.", "Paris.", "The capital of France is Lima.")]
    task = RewardTask(cfg, as_examples([group]), [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    model = task.build_model().eval()
    with torch.no_grad():
        alone = [model(input_ids=torch.from_numpy(s.astype(np.int64))[None]).logits[0, 0].item() for s in group]
        loss, count = task.loss(model, task._batch(as_examples([group])))
    expected = sum(bt(alone[i] - alone[j]) for i, j in combinations(range(3), 2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert int(count) == 1


def test_with_a_likelihood_weight_each_response_scores_its_head_plus_its_mean_logprob(tmp_path, tiny_policy_dir,
                                                                                    tokenizer):
    """The reward task trains score = head + w * mean log pi(response | prompt), pi the reward model's
    own language model (sft/'s at the start): the loss by hand from sft/'s logprobs and the head."""
    from rlhf_ray.data.records import ComparisonRecord
    from rlhf_ray.modeling import LIKELIHOOD_WEIGHT
    from rlhf_ray.train.stages import preference_groups

    cfg = run_config(tmp_path, "reward", likelihood_weight=2.0, lm_loss_weight=0.0)
    responses = ["The capital of France is Paris.", "Paris.", "The capital of France is Lima."]
    record = ComparisonRecord.model_validate({"prompt": "Capital of France?", "responses": responses})
    groups = preference_groups([record], tokenizer, 512)
    task = RewardTask(cfg, groups, [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    model = task.build_model().eval()
    assert getattr(model.config, LIKELIHOOD_WEIGHT) == 2.0
    policy = load_policy(tiny_policy_dir).eval()
    expected = []
    with torch.no_grad():
        for example in groups[0]:
            ids = torch.from_numpy(example.ids.astype(np.int64))[None]
            head = model(input_ids=ids).logits[0, 0].item()
            logprobs = policy(ids).logits[0].log_softmax(-1)
            said = [t for t in range(len(example.ids)) if example.mask[t]]
            expected.append(head + 2.0 * sum(logprobs[t - 1, example.ids[t]].item() for t in said) / len(said))
        loss, count = task.loss(model, task._batch(groups))
    assert loss.item() == pytest.approx(sum(bt(expected[i] - expected[j]) for i, j in combinations(range(3), 2)) / 3,
                                        rel=1e-4)
    assert expected[0] > expected[2]  # sft/ knows Paris (the new head is near 0): the false fact scores lower


def test_an_lm_loss_weight_adds_the_best_responses_cross_entropy_to_each_comparison(tmp_path, tiny_policy_dir,
                                                                                  tokenizer):
    """With lm_loss_weight v a comparison's loss is its Bradley-Terry loss plus v times the mean
    per-token cross-entropy of its best response under the reward model's own language model:
    what keeps that model knowing which answer fits which question while the Bradley-Terry loss
    trains the likelihood term (by hand from sft/'s logprobs, as the model starts)."""
    from rlhf_ray.data.records import ComparisonRecord
    from rlhf_ray.train.stages import preference_groups

    records = [ComparisonRecord.model_validate({"prompt": "Capital of France?", "responses": [
                   "The capital of France is Paris.", "Paris.", "The capital of France is Lima."]}),
               ComparisonRecord.model_validate({"prompt": "Currency of Japan?", "chosen": "The yen.",
                                                "rejected": "Japan has 124 million people."})]
    groups = preference_groups(records, tokenizer, 512)
    policy = load_policy(tiny_policy_dir).eval()

    def mean_logprob(example: ChatExample) -> float:
        ids = torch.from_numpy(example.ids.astype(np.int64))[None]
        logprobs = policy(ids).logits[0].log_softmax(-1)
        said = [t for t in range(len(example.ids)) if example.mask[t]]
        return sum(logprobs[t - 1, example.ids[t]].item() for t in said) / len(said)

    losses = {}
    for lm_weight in (0.0, 0.5):
        cfg = run_config(tmp_path, "reward", likelihood_weight=2.0, lm_loss_weight=lm_weight)
        task = RewardTask(cfg, groups, [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
        with torch.no_grad():
            losses[lm_weight], count = task.loss(task.build_model().eval(), task._batch(groups))
        assert int(count) == 2
    with torch.no_grad():
        best_cross_entropy = -(mean_logprob(groups[0][0]) + mean_logprob(groups[1][0]))
    assert best_cross_entropy > 1  # a real term: the tiny model is far from certain
    assert losses[0.5].item() == pytest.approx(losses[0.0].item() + 0.5 * best_cross_entropy, rel=1e-4)


def test_an_lm_loss_weight_or_a_gate_without_a_likelihood_term_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="reward.lm_loss_weight 0.5 .* reward.likelihood_weight 0"):
        run_config(tmp_path, "reward", likelihood_weight=0.0, lm_loss_weight=0.5)
    with pytest.raises(ValueError, match="reward.likelihood_gate .* reward.likelihood_weight 0"):
        run_config(tmp_path, "reward", likelihood_weight=0.0, lm_loss_weight=0.0, likelihood_gate=True)


@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_embeddings_stay_sft_s_while_the_rest_of_the_reward_model_trains(tmp_path, tiny_policy_dir,
                                                                                tokenizer, freeze):
    """reward.freeze_embeddings keeps the token table (tied: in and out) exactly as sft/ has it,
    in training and in the exported folder; the layers, the head and the gate still learn."""
    from rlhf_ray.data.records import ComparisonRecord
    from rlhf_ray.train.stages import preference_groups

    records = [ComparisonRecord.model_validate({"prompt": f"Capital of {country}?", "responses": [
                   f"The capital of {country} is {city}.", f"{city}.", f"The capital of {country} is Lima."]})
               for country, city in (("France", "Paris"), ("Japan", "Tokyo"))]
    groups = preference_groups(records, tokenizer, 512)
    cfg = run_config(tmp_path, "reward", steps=3, eval_every=3, likelihood_weight=1.0, lm_loss_weight=0.5,
                     likelihood_gate=True, freeze_embeddings=freeze)
    task = RewardTask(cfg, groups, groups, init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    train(task, Worker(metrics_path=tmp_path / "metrics" / "reward.jsonl"))

    sft, reward = load_file(tiny_policy_dir / "model.safetensors"), load_file(task.out_dir / "model.safetensors")
    table = "model.embed_tokens.weight"
    assert torch.equal(reward[table], sft[table]) == freeze
    assert not torch.equal(reward["model.layers.0.mlp.up_proj.weight"], sft["model.layers.0.mlp.up_proj.weight"])
    assert load_file(task.out_dir / "likelihood_gate.safetensors")["weight"].abs().sum() > 0


@pytest.mark.parametrize("world", [1, 2])
def test_a_reward_micro_batch_keeps_every_response_of_a_comparison_together(tmp_path, tiny_policy_dir, world):
    cfg = run_config(tmp_path, "reward", batch_size=4, micro_batch_size=2)
    # comparison g: responses [40+g, ..., rank], of varied lengths, best (rank 0) first
    groups = [[seq(40 + g, *[7] * ((g + rank) % 3), rank) for rank in range(size)]
              for g, size in enumerate([3, 2, 2, 3, 2])]
    task = RewardTask(cfg, as_examples(groups), [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    for step in range(3):  # 5 comparisons, 4 a step: step 1 crosses into the second epoch
        seen = []
        for rank in range(world):
            mine = worker_slice(epoch_order(5, 4, step, cfg.seed), rank, world)
            first = len(seen)
            for batch in task.micro_batches(step, rank, world):
                sizes = batch["group_sizes"].tolist()
                assert sum(sizes) == batch["input_ids"].shape[0]
                rows = zip(torch.split(batch["input_ids"], sizes), torch.split(batch["attention_mask"], sizes))
                for ids, mask in rows:
                    sequences = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
                    g = sequences[0][1] - 40
                    assert sequences == [s.tolist() for s in groups[g]]
                    seen.append(g)
            assert sorted(seen[first:]) == sorted(mine)  # this worker's comparisons, each once
        assert sorted(seen) == sorted(epoch_order(5, 4, step, cfg.seed))


def test_a_step_is_cut_into_micro_batches_shortest_first(tmp_path, tiny_policy_dir):
    """Padding is to each micro-batch's longest: similar lengths together pad the least."""
    cfg = run_config(tmp_path, "reward", batch_size=6, micro_batch_size=2)
    groups = [[seq(40 + g, *[7] * length), seq(40 + g)] for g, length in enumerate([9, 1, 5, 3, 8, 2])]
    task = RewardTask(cfg, as_examples(groups), [], init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    widths = [batch["input_ids"].shape[1] for batch in task.micro_batches(0, 0, 1)]
    assert widths == [1 + 1 + 2, 1 + 1 + 5, 1 + 1 + 9]  # pairs (1, 2), (3, 5), (8, 9)

    sft = run_config(tmp_path, "sft", batch_size=4, micro_batch_size=2)
    examples = [ChatExample(ids=seq(*[5] * n), mask=np.ones(n + 1, dtype=np.int32)) for n in (6, 1, 4, 2)]
    task = SFTTask(sft, examples, [], init_dir=tiny_policy_dir, out_dir=tmp_path / "sft")
    assert [batch["input_ids"].shape[1] for batch in task.micro_batches(0, 0, 1)] == [1 + 2, 1 + 6]


@pytest.mark.parametrize("ranking, accuracy", [
    ("ordered", 1.0),
    ("reversed", 0.0),
    ("one pair swapped", 3 / 4),
])
def test_reward_evaluation_scores_the_accuracy_of_every_pair(tmp_path, tiny_policy_dir, ranking, accuracy):
    cfg = run_config(tmp_path, "reward", micro_batch_size=1)
    first = {"ordered": [seq(7), seq(4, 3), seq(1)],  # rewards 7, 3, 1
             "reversed": [seq(1), seq(4, 3), seq(7)],
             "one pair swapped": [seq(7), seq(1), seq(4, 3)]}[ranking]
    second = [seq(2), seq(6)] if ranking == "reversed" else [seq(6), seq(2)]
    task = RewardTask(cfg, as_examples([[seq(1), seq(2)]]), as_examples([first, second]),
                      init_dir=tiny_policy_dir, out_dir=tmp_path / "reward")
    result = task.evaluate(LastTokenReward())
    assert result["eval_accuracy"] == pytest.approx(accuracy)
    rewards = [[float(s[-1]) for s in group] for group in (first, second)]
    per_comparison = [sum(bt(r[i] - r[j]) for i, j in combinations(range(len(r)), 2)) / math.comb(len(r), 2)
                      for r in rewards]
    assert result["eval_loss"] == pytest.approx(sum(per_comparison) / 2)


def test_reward_evaluation_reads_each_held_out_sequence_once(tmp_path, tiny_policy_dir):
    """The loss and the accuracy come from one pass (two passes were a third of the demo's reward stage)."""
    cfg = run_config(tmp_path, "reward", micro_batch_size=2)
    held_out = [[seq(7), seq(1)], [seq(6), seq(2), seq(3)], [seq(5), seq(4)]]
    task = RewardTask(cfg, as_examples([[seq(1), seq(2)]]), as_examples(held_out), init_dir=tiny_policy_dir,
                      out_dir=tmp_path / "reward")
    model = LastTokenReward()
    rows_read = []
    model.register_forward_hook(lambda module, args, kwargs, out: rows_read.append(len(kwargs["input_ids"])),
                                with_kwargs=True)
    task.evaluate(model)
    assert sum(rows_read) == 7  # every sequence of the three comparisons, once


# --------------------------------------------------------------------------- the loop


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_training_lowers_the_loss_writes_a_metrics_line_per_step_and_exports(tmp_path, tiny_policy_dir,
                                                                                 examples):
    cfg = run_config(tmp_path, steps=5, eval_every=2, checkpoint_every=2)
    task = SFTTask(cfg, examples, examples, init_dir=tiny_policy_dir, out_dir=tmp_path / "sft")
    before = task.evaluate(task.build_model())["eval_loss"]
    metrics_path = tmp_path / "metrics" / "sft.jsonl"

    last = train(task, Worker(metrics_path=metrics_path))

    lines = read_metrics(metrics_path)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    tokens_per_step = sum(len(e.ids) for e in examples)  # batch_size 4 = every example, every step
    for m in lines:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= m.keys()
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, 5, cfg.sft.optim))
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
        assert m["tokens_per_s"] * m["step_s"] == pytest.approx(tokens_per_step)
        assert 0 < m["mfu"] < 1
    assert [m["step"] for m in lines if "eval_loss" in m] == [2, 4, 5]  # every 2nd, and the last
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert last == lines[-1] and last["eval_loss"] < before

    check_model_folder(task.out_dir)
    exported = task.evaluate(load_policy(task.out_dir))["eval_loss"]
    assert exported == pytest.approx(last["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_a_step_follows_the_mean_loss_per_target_token_however_the_batch_is_split(tmp_path, tiny_policy_dir,
                                                                                 examples, micro_batch_size):
    cfg = run_config(tmp_path, steps=1, batch_size=4, micro_batch_size=micro_batch_size)
    task = SFTTask(cfg, examples, [], init_dir=tiny_policy_dir, out_dir=tmp_path / "sft")
    # by hand: the whole batch in one pass, the summed loss divided by its target tokens
    model = task.build_model()
    whole = task._batch(examples)
    loss, count = lm_loss(model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits,
                          whole["labels"])
    (loss / count).backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()

    metrics = train(task, Worker())

    assert metrics["loss"] == pytest.approx(loss.item() / int(count), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_a_resumed_run_continues_from_the_checkpoint_and_ends_with_the_same_weights(tmp_path, tiny_policy_dir,
                                                                                    examples):
    cfg = run_config(tmp_path, steps=4, checkpoint_every=2, batch_size=2, micro_batch_size=1)
    whole = SFTTask(cfg, examples, examples[:1], init_dir=tiny_policy_dir, out_dir=tmp_path / "whole")
    metrics_path = tmp_path / "metrics" / "sft.jsonl"
    saved = tmp_path / "checkpoint-2"

    def keep_step_2(metrics, checkpoint):
        if metrics["step"] == 2:
            shutil.copytree(checkpoint, saved)  # what Ray Train does with a reported checkpoint

    train(whole, Worker(metrics_path=metrics_path, report=keep_step_2))
    uninterrupted = metrics_path.read_text().splitlines()
    assert json.loads((saved / "state.json").read_text()) == {"step": 2}

    resumed = replace(whole, out_dir=tmp_path / "resumed")
    reported = []
    train(resumed, Worker(metrics_path=metrics_path, report=lambda m, c: reported.append(m["step"]),
                          resume_from=lambda: nullcontext(saved)))

    assert reported == [4]  # steps 3 and 4 only: 2 was not trained again
    lines = metrics_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # each step once
    assert lines[:2] == uninterrupted[:2]  # the lines before the checkpoint are kept as written
    for mine, theirs in zip(read_metrics(metrics_path)[2:], [json.loads(x) for x in uninterrupted[2:]]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    expected = load_file(whole.out_dir / "model.safetensors")
    actual = load_file(resumed.out_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_keep_metrics_before_drops_the_lines_after_the_step(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("".join(line + "\n" for line in lines))
    keep_metrics_before(path, 3)
    assert path.read_text() == "".join(line + "\n" for line in lines[:3])
    keep_metrics_before(path, 0)
    assert path.read_text() == ""


def test_keep_metrics_before_leaves_a_missing_file_missing(tmp_path):
    keep_metrics_before(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    """A checkpoint of a tiny policy taken after one optimizer step, and a fresh model to load it into."""
    model = new_policy(TINY_MODEL, tiny_tokenizer, seed=0)
    optimizer = make_optimizer(model, Optim())
    ids = torch.tensor([tiny_tokenizer.encode_document("The capital of Peru is Lima.")])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_checkpoint(folder, model, optimizer, 1)
    fresh = new_policy(TINY_MODEL, tiny_tokenizer, seed=1)
    return SimpleNamespace(folder=folder, model=model, optimizer=optimizer,
                           fresh=fresh, fresh_optimizer=make_optimizer(fresh, Optim()))


def test_a_checkpoint_restores_the_weights_the_optimizer_and_the_step(checkpoint):
    assert load_checkpoint(checkpoint.folder, checkpoint.fresh, checkpoint.fresh_optimizer) == 1
    torch.testing.assert_close(checkpoint.fresh.state_dict(), checkpoint.model.state_dict())
    assert checkpoint.fresh.lm_head.weight is checkpoint.fresh.model.embed_tokens.weight  # still tied
    saved, loaded = checkpoint.optimizer.state_dict(), checkpoint.fresh_optimizer.state_dict()
    torch.testing.assert_close(loaded["state"], saved["state"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("name, damage", [
    ("state.json", Path.unlink),
    ("state.json", lambda p: p.write_text("{")),
    ("model.safetensors", Path.unlink),
    ("model.safetensors", _truncate),
    ("optimizer.pt", _truncate),
    ("optimizer.pt", lambda p: p.write_bytes(b"")),
    ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file")),
], ids=["no state", "bad state", "no weights", "cut weights", "cut optimizer", "empty optimizer",
        "garbage optimizer"])
def test_loading_a_corrupt_checkpoint_raises_runtime_error_naming_the_folder(checkpoint, name, damage):
    damage(checkpoint.folder / name)
    with pytest.raises(RuntimeError, match=re.escape(f"{checkpoint.folder}: cannot resume")):
        load_checkpoint(checkpoint.folder, checkpoint.fresh, checkpoint.fresh_optimizer)


def test_loading_another_models_checkpoint_raises_runtime_error_naming_the_folder(checkpoint, tiny_reward_dir):
    reward = load_scalar_model(tiny_reward_dir)
    save_checkpoint(checkpoint.folder, reward, make_optimizer(reward, Optim()), 1)
    with pytest.raises(RuntimeError, match=re.escape(f"{checkpoint.folder}: cannot resume")):
        load_checkpoint(checkpoint.folder, checkpoint.fresh, checkpoint.fresh_optimizer)
