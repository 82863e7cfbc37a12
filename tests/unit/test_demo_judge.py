"""The demo's simulated person: which faults a reply has, and a score that ranks replies the way
the demo's own comparisons do."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf_ray.compare.demo_judge import faults, score, states
from rlhf_ray.config import DemoDataConfig
from rlhf_ray.data.demo import HABITS, asked, write_demo_data
from rlhf_ray.data.world import fact

CAPITAL = "What is the capital of France?"


@pytest.mark.parametrize("reply, found", [
    ("The capital of France is Paris.", []),
    ("Paris is the capital of France.", []),
    ("Paris.", ["terse"]),
    ("The capital of France is Paris. Its currency is the euro.", ["extra_fact"]),
    ("Sure! The capital of France is Paris.", ["chatty"]),
    ("The capital of France is Paris. Hope this helps!", ["chatty"]),
    ("I think the capital of France is Paris.", ["hedged"]),
    ("If I remember correctly, the capital of France is Paris. Hope this helps!", ["chatty", "hedged"]),
    ("France is lovely. " * 5 + "The capital of France is Paris.", ["rambling"]),
    ("The capital of France is Paris, isn't it?", ["question"]),
    ("I'm not sure, you could look that up.", ["evasive"]),
    ("The main language of France is French.", ["off_topic"]),
    ("The capital of Germany is Berlin.", ["other_country"]),
    ("What is the capital of France?\nWhat is the capital of Peru?", ["question"]),
    ("The capital of France is Berlin.", ["wrong"]),
    ("The capital of France is Paris or Berlin.", ["wrong"]),
    ("   ", ["empty"]),
])
def test_each_fault_of_a_reply_is_named(reply, found):
    assert faults(CAPITAL, reply, "Paris") == found


def test_a_value_inside_a_longer_value_is_not_stated():
    assert states("Japan uses the Japanese yen.", "Japanese yen")
    assert not states("Japan uses the Japanese yen.", "Japanese")
    assert faults("Which language is spoken in Japan?", "Japan uses the Japanese yen.", "Japanese") == [
        "off_topic"]
    assert faults("What is the capital of Mexico?", "Mexico City.", "Mexico City") == ["terse"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), DemoDataConfig())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_labeler_ranks_every_demo_comparison_in_its_order(demo):
    """The template comparisons and the labeler's rankings teach the reward model the same order."""
    for name in ("reward", "reward_eval"):
        for record in rows(demo[name]):
            replies = record.get("responses") or [record["chosen"], record["rejected"]]
            truth = fact(*asked(record["prompt"]))
            scores = [score(record["prompt"], r, truth) for r in replies]
            assert all(a > b for a, b in zip(scores, scores[1:])), (record, scores)


def test_about_demonstration_faults_of_the_sft_answers_have_a_habit_most_often_the_pleasantry(demo):
    """Each answer has at most one habit, as the judge names it; 0.75 of them have one, 0.7 of
    those the pleasantry (what the SFT model then ends its answers with)."""
    counts: Counter = Counter()
    for record in rows(demo["sft"]):
        question, reply = record["messages"][-2]["content"], record["messages"][-1]["content"]
        if (got := asked(question)) is not None:  # not a follow-up ("And what is its capital?")
            counts[tuple(faults(question, reply, fact(*got)))] += 1
    assert set(counts) == {(), *((h,) for h in HABITS)}, counts
    total = sum(counts.values())
    assert 0.7 < 1 - counts[()] / total < 0.8
    assert counts[("chatty",)] / (total - counts[()]) == pytest.approx(0.7, abs=0.06)


def test_no_demonstration_faults_gives_clean_answers(tmp_path):
    clean = write_demo_data(tmp_path, DemoDataConfig(demonstration_faults=0.0))
    for record in rows(clean["sft"]):
        turns = record["messages"]
        for question, reply in zip(turns, turns[1:]):
            if question["role"] == "user" and (got := asked(question["content"])):
                assert faults(question["content"], reply["content"], fact(*got)) == []
