"""The preference half of the evaluation: win rates against SFT, fault rates, and the reward
model's pairwise accuracy per kind of pair and by margin, each checked by hand."""

from __future__ import annotations

import importlib

import pytest

from rlhf_ray.data.records import ComparisonRecord, PromptRecord
from rlhf_ray.preference_eval import differing_questions, fault_rates, markdown, reward_judgement, win_rates
from rlhf_ray.stage_eval import check_claims

RECORDS = [PromptRecord(prompt="What is the capital of France?", ground_truth="Paris"),
           PromptRecord(prompt="What is the capital of Peru?", ground_truth="Lima"),
           PromptRecord(prompt="Which currency is used in Japan?", ground_truth="Japanese yen"),
           PromptRecord(prompt="What is the capital of Kenya?", ground_truth="Nairobi")]
SFT = ["I think the capital of France is Paris.", "The capital of Peru is Lima.",
       "Japan uses the Japanese yen.", "Sure! The capital of Kenya is Nairobi."]
RLHF = ["The capital of France is Paris.", "The capital of Peru is Lima.",
        "Japan uses the Japanese yen. Its capital is Tokyo.", "The capital of Kenya is Nairobi."]
calls: list[list[str]] = []


def counting_labeler(prompt, responses, ground_truth):
    """The demo's judge, counting how often it is asked."""
    from rlhf_ray.compare.labelers import demo_labeler

    calls.append(responses)
    return demo_labeler(prompt, responses, ground_truth)


def test_a_stage_wins_ties_and_loses_against_sft_question_by_question():
    labeler = "tests.unit.test_preference_eval:counting_labeler"
    calls = importlib.import_module(labeler.split(":")[0]).calls  # the module the labeler is in
    calls.clear()
    got = win_rates(labeler, RECORDS,
                    {"sft": SFT, "rlhf": RLHF, "dpo": SFT}, against="sft")
    # France: hedge removed (win); Peru: identical (tie, not asked); Japan: a fact added (loss);
    # Kenya: filler removed (win).
    assert got["rlhf"] == {"wins": 2, "ties": 1, "losses": 1, "win_rate": 2 / 3}
    assert got["dpo"] == {"wins": 0, "ties": 4, "losses": 0, "win_rate": None}  # all identical
    assert len(calls) == 3 and "sft" not in got


def test_fault_rates_count_each_fault_over_the_replies():
    rates = fault_rates(RECORDS, {"sft": SFT, "rlhf": RLHF})
    assert rates["sft"]["any"] == 0.5 and rates["sft"]["hedged"] == 0.25 and rates["sft"]["chatty"] == 0.25
    assert rates["rlhf"]["any"] == 0.25 and rates["rlhf"]["extra_fact"] == 0.25 and rates["rlhf"]["hedged"] == 0


def test_the_reward_models_accuracy_overall_per_kind_and_by_margin():
    records = [
        ComparisonRecord(prompt="What is the capital of France?",
                         responses=["The capital of France is Paris.", "I think the capital of France is Paris.",
                                    "The capital of France is Berlin."]),  # a ranking: 3 pairs
        ComparisonRecord(prompt="What is the capital of Peru?", chosen="The capital of Peru is Lima.",
                         rejected="I think the capital of Peru is Lima, I believe."),
        ComparisonRecord(prompt="Say something nice.", chosen="You are kind.", rejected="No."),
    ]
    # A scorer that likes short replies: right when the better reply is the shorter one.
    scored: list[int] = []

    def score(conversations):
        scored.append(len(conversations))
        return [-float(len(c[-1].content)) for c in conversations]

    judged = reward_judgement(score, records)
    assert scored == [7]  # each distinct conversation once
    assert judged["pairs"] == 5
    # good>hedged (France) right, good>wrong right (29 vs 32 chars), hedged>wrong wrong (38 vs 32),
    # Peru good>hedged right, "You are kind." > "No." wrong.
    assert judged["accuracy"] == pytest.approx(3 / 5)
    assert judged["by_kind"] == {"good > hedged": {"pairs": 2, "accuracy": 1.0},
                                 "good > wrong": {"pairs": 1, "accuracy": 1.0},
                                 "hedged > wrong": {"pairs": 1, "accuracy": 0.0}}
    bins = judged["calibration"]
    assert sum(b["pairs"] for b in bins) == 5
    assert [b["margin_from"] for b in bins] == sorted(b["margin_from"] for b in bins)
    assert all(b["margin_from"] <= b["margin_to"] for b in bins)


def test_the_side_by_side_questions_are_where_tuning_changed_the_reply():
    replies = {"sft": ["a", "b", "c", "d", "e"], "rlhf": ["a", "B", "c", "D", "e"], "dpo": ["a", "b", "C", "d", "e"]}
    assert differing_questions(replies, "sft", ["rlhf", "dpo"], 6) == [1, 2, 3]
    assert differing_questions(replies, "sft", ["rlhf", "dpo"], 2) == [1, 3]
    assert differing_questions(replies, "sft", ["rlhf"], 6) == [1, 3]


def test_rlhf_preferred_over_sft_is_one_of_the_talks_claims():
    wins = {"rlhf": {"wins": 6, "ties": 10, "losses": 2, "win_rate": 0.75},
            "dpo": {"wins": 0, "ties": 18, "losses": 0, "win_rate": None}}
    claims = {c["claim"]: c for c in check_claims({"rlhf": {}, "dpo": {}}, wins)}
    assert claims["RLHF answers are preferred over SFT's"]["holds"] is True
    assert claims["RLHF answers are preferred over SFT's"]["detail"] == "rlhf win rate vs sft 0.750 > even 0.500"
    assert claims["DPO answers are preferred over SFT's"]["holds"] is None  # every reply tied
    assert "RLHF answers are preferred over SFT's" not in {c["claim"] for c in check_claims({"rlhf": {}})}


def test_the_preference_sections_render_as_tables():
    result = {"labeler": "demo", "win_rates": win_rates("demo", RECORDS, {"sft": SFT, "rlhf": RLHF}, "sft"),
              "fault_rates": fault_rates(RECORDS, {"sft": SFT, "rlhf": RLHF}),
              "reward_model": {"pairs": 2, "accuracy": 0.5, "by_kind": {"good > hedged": {"pairs": 2, "accuracy": 0.5}},
                               "calibration": [{"margin_from": 0.1, "margin_to": 0.3, "pairs": 2, "accuracy": 0.5}]}}
    text = "\n".join(markdown(result, "sft"))
    assert "| rlhf | 2 | 1 | 1 | 67% |" in text
    assert "| model | any | extra_fact | chatty | hedged |" in text and "| sft | 50% | 0% | 25% | 25% |" in text
    assert "pairwise accuracy **0.500** over 2 pairs" in text and "| good > hedged | 2 | 0.50 |" in text
    assert "| 0.10–0.30 | 2 | 0.50 |" in text


def test_the_evaluations_labeler_is_demo_or_a_function():
    from rlhf_ray.config import ConfigError, validate_config

    assert validate_config({"evaluation": {"labeler": "my.judge:score"}}).evaluation.labeler == "my.judge:score"
    with pytest.raises(ConfigError, match="evaluation.labeler: .*unknown labeler 'human'"):
        validate_config({"evaluation": {"labeler": "human"}})
