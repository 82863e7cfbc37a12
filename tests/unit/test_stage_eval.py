"""The evaluation across stages: the answers rule, the few-shot format, the claims, one tiny run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import DPOConfig, validate_config
from rlhf_ray.evaluate import generate_greedy, newline_tokens
from rlhf_ray.modeling import load_policy
from rlhf_ray.report import stages_section
from rlhf_ray.run import RunFolder
from rlhf_ray.stage_eval import (
    MAX_NEW_TOKENS,
    answers,
    check_claims,
    evaluate_stages,
    few_shot_examples,
    first_line,
    first_line_ids,
    held_out_questions,
    kl_along,
)
from tests.tiny import TINY_MODEL

QUESTIONS = [
    {"prompt": "What is the capital of Peru?", "ground_truth": "Lima"},
    {"prompt": "What is the capital of Kenya?", "ground_truth": "Nairobi"},
    {"prompt": "Tell me the capital of Japan.", "ground_truth": "Tokyo"},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"}], "ground_truth": "Paris"},
    {"prompt": "Say something about Peru."},  # no reference answer: not scored
]
CHATS = [
    {"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."},
    {"prompt": "Where is Peru?", "completion": "Peru is in South America."},
    {"prompt": "Which language is spoken in Japan?", "completion": "Japanese."},
    {"prompt": "How many people live in Kenya?", "completion": "About 55 million."},
    {"prompt": "Tell me the currency of Japan.", "completion": "The yen."},
    {"prompt": "What is the capital of Peru?", "completion": "Lima."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "Capital of Kenya?"},
                  {"role": "assistant", "content": "Nairobi."},
                  {"role": "user", "content": "And Peru?"}, {"role": "assistant", "content": "Lima."}]},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


COMPARISONS = [
    {"prompt": "What is the capital of Peru?", "chosen": "The capital of Peru is Lima.", "rejected": "Lima?"},
    {"prompt": "What is the capital of Kenya?",
     "responses": ["The capital of Kenya is Nairobi.", "Nairobi.", "I don't know."]},
]


def make_config(tmp_path: Path, questions: list[dict] = QUESTIONS, chats: list[dict] = CHATS, **evaluation):
    rl_eval = write_jsonl(tmp_path / "rl_eval.jsonl", questions)
    sft = write_jsonl(tmp_path / "sft.jsonl", chats)
    reward_eval = write_jsonl(tmp_path / "reward_eval.jsonl", COMPARISONS)
    return validate_config({"name": "tiny", "runs_dir": str(tmp_path), "model": TINY_MODEL.model_dump(),
                            "evaluation": evaluation,
                            "data": {"demo": None, "rl_eval": [str(rl_eval)], "sft": [str(sft)],
                                     "reward_eval": [str(reward_eval)]}})


@pytest.mark.parametrize("reply, expected", [
    ("", False),
    ("   \nLima is the capital.", False),  # the first line is empty: the model moved on
    ("What is the capital of Chile?", False),  # another question: continuing a quiz
    ("what is the capital of peru?", False),
    ("What is the capital of Peru", False),  # the question repeated
    ("The capital of Peru is Lima.\nQ: What is", True),
    ("I don't know.", True),
])
def test_answers_means_a_first_line_that_is_not_a_question(reply, expected):
    assert answers("What is the capital of Peru?", reply) is expected
    assert answers("What is the capital of Peru", reply) is expected


def test_few_shot_examples_are_single_turn_seeded_and_varied(tmp_path):
    cfg = make_config(tmp_path)
    chosen = few_shot_examples(cfg)
    assert chosen == few_shot_examples(cfg)
    assert len(chosen) == 5 and all(q != "Hi?" and q != "Capital of Kenya?" for q, _ in chosen)
    assert len({q.split()[0] for q, _ in chosen}) == 5
    assert [q for q, _ in chosen] != [q for q, _ in few_shot_examples(cfg.model_copy(update={"seed": 1}))]


def test_too_few_examples_or_no_questions_are_refused_naming_the_files(tmp_path):
    with pytest.raises(ValueError, match="5 single-turn.*sft.jsonl hold 2"):
        few_shot_examples(make_config(tmp_path, chats=CHATS[:2] + CHATS[6:]))
    with pytest.raises(ValueError, match="no held-out questions.*rl_eval.jsonl"):
        held_out_questions(make_config(tmp_path, questions=QUESTIONS[3:]))
    assert [r.ground_truth for r in held_out_questions(make_config(tmp_path))] == ["Lima", "Nairobi", "Tokyo"]


def numbers(answers: float, shots: list[float], sft: float, rlhf: float, rewards=(0.1, 0.5)) -> dict:
    variants = {"base 0-shot": {"answers": answers, "exact_match": 0.0}}
    variants |= {f"base {k}-shot": {"exact_match": em} for k, em in zip((1, 3, 5), shots)}
    variants["sft"] = {"exact_match": sft, "reward": rewards[0]}
    variants["rlhf"] = {"exact_match": rlhf, "reward": rewards[1]}
    return variants


def test_claims_hold_or_not_from_the_numbers():
    assert [c["holds"] for c in check_claims(numbers(0.1, [0.1, 0.3, 0.2], 0.6, 0.6))] == [True] * 5
    claims = check_claims(numbers(0.9, [0.0, 0.0, 0.0], 0.0, 0.5, rewards=(0.5, 0.2)))
    assert [c["holds"] for c in claims] == [False, False, False, False, True]
    assert "base 1-shot exact_match 0.000 not > base 0-shot exact_match 0.000" == claims[1]["detail"]
    claims = check_claims(numbers(0.1, [0.1, 0.3, 0.2], 0.6, 0.5))
    assert claims[2]["detail"] == "sft exact_match 0.600 > base 3-shot exact_match 0.300"
    assert claims[4]["holds"] is False


def test_the_reward_model_s_claim_is_its_held_out_accuracy_against_the_goal():
    variants = numbers(0.1, [0.1, 0.3, 0.2], 0.6, 0.6)
    [judged] = [c for c in check_claims(variants, reward_accuracy=0.8489)
                if c["claim"] == "the reward model ranks held-out replies as the labeler does"]
    assert judged["holds"] is False  # 0.849 is short of 0.85, however it rounds
    assert judged["detail"] == "reward model held-out accuracy 0.849 not >= goal 0.850"
    assert [c["holds"] for c in check_claims(variants, reward_accuracy=0.85)][3] is True
    assert len(check_claims(variants)) == 5  # no reward model judged: no claim about it


def test_claims_without_their_inputs_are_not_measured():
    variants = numbers(0.1, [0.1, 0.3, 0.2], 0.6, 0.6)
    del variants["rlhf"]
    variants["sft"]["reward"] = None
    claims = check_claims(variants)
    assert [c["holds"] for c in claims] == [True, True, True, None, None]
    assert claims[3]["detail"] == "not measured (no rlhf reward or sft reward)"
    assert [c["holds"] for c in check_claims({})] == [None] * 5


def test_evaluate_stages_on_a_tiny_run(tmp_path, tiny_policy_dir, tiny_reward_dir):
    cfg = make_config(tmp_path, labeler="demo")
    for stage in ("base", "sft", "rlhf"):
        shutil.copytree(tiny_policy_dir, cfg.run_dir / stage)
    shutil.copytree(tiny_reward_dir, cfg.run_dir / "reward")
    out = evaluate_stages(cfg, log=lambda _: None)
    assert out == cfg.run_dir / "eval"
    assert {p.name for p in out.iterdir()} == {"stages.json", "stages.md", "stages.png"}
    assert (out / "stages.png").read_bytes().startswith(b"\x89PNG")
    result = json.loads((out / "stages.json").read_text())
    assert result["questions"] == 3 and result["skipped"] == {}
    names = ["base 0-shot", "base 1-shot", "base 3-shot", "base 5-shot", "sft", "rlhf"]
    assert [v["name"] for v in result["variants"]] == names
    for v in result["variants"]:
        assert 0 <= v["exact_match"] <= 1 and 0 <= v["answers"] <= 1 and v["count"] == 3
        assert 0 <= v["length"] <= 48 and isinstance(v["reward"], float)
        assert [s["reference"] for s in v["samples"]] == ["Lima", "Nairobi", "Tokyo"]
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["rlhf"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)  # the same weights as sft
    assert by_name["sft"]["kl_to_sft"] == 0.0 and by_name["base 0-shot"]["kl_to_sft"] is None
    assert by_name["sft"]["samples"] == by_name["rlhf"]["samples"]
    # an untrained reward model misses the accuracy goal; RLHF's replies are SFT's: equal RM scores
    # and matches, and every comparison ties, so no win rate is measured
    assert [c["holds"] for c in result["claims"]][3:] == [False, False, True, None]
    assert result["win_rates"] == {"rlhf": {"wins": 0, "ties": 3, "losses": 0, "win_rate": None}}
    assert result["labeler"] == "demo" and "fault_rates" not in result  # not the demo's questions
    judged = result["reward_model"]
    assert judged["pairs"] == 4 and 0 <= judged["accuracy"] <= 1 and judged["by_kind"]
    text = (out / "stages.md").read_text()
    assert "| model | exact match | RM score | KL to SFT | length (tokens) | answers |" in text
    assert "![stages](stages.png)" in text and "first line" in text
    section = stages_section(RunFolder(cfg.run_dir))
    assert section[1] == "## Evaluation across stages" and "![stages](eval/stages.png)" in section


def test_missing_models_are_skipped_with_the_reason(tmp_path, tiny_policy_dir):
    cfg = make_config(tmp_path)
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    result = json.loads((evaluate_stages(cfg, log=lambda _: None) / "stages.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["sft"]
    assert set(result["skipped"]) == {"base 0-shot", "base 1-shot", "base 3-shot", "base 5-shot", "rlhf"}
    assert "no config.json" in result["skipped"]["rlhf"]
    assert result["variants"][0]["reward"] is None
    assert [c["holds"] for c in result["claims"]] == [None] * 5


def test_a_continuation_ends_after_an_end_token_and_keeps_it(tiny_policy_dir, tiny_tokenizer):
    prompts = [tiny_tokenizer.encode_document(t) for t in ("The capital of", "The capital of Peru")]
    full = generate_greedy(tiny_policy_dir, prompts, 24)
    end = full[0][3]
    ended = generate_greedy(tiny_policy_dir, prompts, 24, end_after={end})
    for whole, cut in zip(full, ended):
        assert cut == (whole[:whole.index(end) + 1] if end in whole else whole)
    assert len(ended[0]) == 4


def test_a_base_reply_stops_at_its_line_break_with_the_same_first_line(tiny_tokenizer):
    line_ends = newline_tokens(tiny_tokenizer)
    assert tiny_tokenizer.encode("\n") and set(tiny_tokenizer.encode("\n")) <= line_ends
    assert all("\n" in tiny_tokenizer.decode([i]) for i in line_ends)
    reply = tiny_tokenizer.encode("Lima. And then\nQ: next")
    ended = reply[:next(i for i, t in enumerate(reply) if t in line_ends) + 1]
    assert first_line(tiny_tokenizer.decode(ended)) == first_line(tiny_tokenizer.decode(reply)) == "Lima. And then"
    assert first_line_ids(tiny_tokenizer, ended) == first_line_ids(tiny_tokenizer, reply)


def test_kl_along_a_reply_is_exact_and_counts_the_stop_step(tiny_policy_dir, tiny_tokenizer):
    policy, reference = load_policy(tiny_policy_dir).eval(), load_policy(tiny_policy_dir).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in reference.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    prompts = [tiny_tokenizer.encode_document("The capital of"), tiny_tokenizer.encode_document("Peru")]
    replies = [tiny_tokenizer.encode(" Peru is Lima."), list(range(40, 40 + MAX_NEW_TOKENS))]
    pad = tiny_tokenizer.pad_id
    assert kl_along(policy, policy, prompts, replies, pad) == pytest.approx([0.0, 0.0], abs=1e-5)
    got = kl_along(policy, reference, prompts, replies, pad)
    for (prompt, reply), kl in zip(zip(prompts, replies), got):  # one sequence at a time, no padding
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            p = torch.log_softmax(policy(ids).logits[0], -1)
            q = torch.log_softmax(reference(ids).logits[0], -1)
        steps = len(reply) + (len(reply) < MAX_NEW_TOKENS)  # a stopped reply chose its stop token too
        rows = range(len(prompt) - 1, len(prompt) - 1 + steps)
        assert kl == pytest.approx(sum(float((p[t].exp() * (p[t] - q[t])).sum()) for t in rows), rel=1e-4)
        assert kl > 0


def test_a_dpo_model_is_evaluated_next_to_rlhf_and_its_claims_checked(tmp_path, tiny_policy_dir):
    cfg = make_config(tmp_path)
    for stage in ("sft", "rlhf", "dpo"):
        shutil.copytree(tiny_policy_dir, cfg.run_dir / stage)
    result = json.loads((evaluate_stages(cfg, log=lambda _: None) / "stages.json").read_text())
    by_name = {v["name"]: v for v in result["variants"]}
    assert list(by_name)[-3:] == ["sft", "rlhf", "dpo"]
    assert by_name["dpo"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-5)  # the same weights as sft
    assert [c["claim"] for c in result["claims"]][5:] == ["DPO raises the reward model's score over SFT",
                                                           "DPO keeps SFT's exact match"]
    assert [c["holds"] for c in result["claims"]][5:] == [None, True]  # no reward model here


def test_dpo_is_skipped_with_the_reason_only_when_configured(tmp_path, tiny_policy_dir):
    cfg = make_config(tmp_path)
    shutil.copytree(tiny_policy_dir, cfg.run_dir / "sft")
    result = json.loads((evaluate_stages(cfg, log=lambda _: None) / "stages.json").read_text())
    assert "dpo" not in result["skipped"]  # not configured: not expected either
    cfg.dpo = DPOConfig()
    result = json.loads((evaluate_stages(cfg, log=lambda _: None) / "stages.json").read_text())
    assert "no config.json" in result["skipped"]["dpo"]
