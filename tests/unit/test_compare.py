"""Comparison collection: the store every ranking goes through, the labelers, and bad input."""

import json
import multiprocessing
import time

import pytest

from rlhf_ray.compare.collect import read_prompts
from rlhf_ray.compare.labelers import checked_scores, demo_labeler, load_labeler, ranked_by_scores
from rlhf_ray.compare.store import AlreadyRanked, Candidate, ComparisonStore, RankingError
from rlhf_ray.config import ConfigError, validate_config
from rlhf_ray.data.readers import read_records
from rlhf_ray.data.records import ComparisonRecord

QUESTION = [{"role": "user", "content": "What is the capital of Kenya?"}]


def candidate(i: int, k: int = 3) -> Candidate:
    return Candidate(id=f"p{i:05d}", prompt=QUESTION, responses=[f"answer {i}.{j}" for j in range(k)],
                     ground_truth="Nairobi")


@pytest.fixture
def store(tmp_path) -> ComparisonStore:
    store = ComparisonStore(tmp_path / "compare")
    store.write_candidates([candidate(i) for i in range(4)])
    return store


# ------------------------------------------------------------------ recording a person's ranking


def test_a_ranking_is_recorded_best_first_with_labeler_time_and_unacceptable(store):
    record = store.submit("p00001", order=[2, 0, 1], labeler="alice", unacceptable=[1])
    assert [r[0].content for r in record.responses] == ["answer 1.2", "answer 1.0", "answer 1.1"]
    [row] = store.rankings()
    assert row["id"] == "p00001" and row["labeler"] == "alice" and row["time"].endswith("+00:00")
    assert row["responses"] == ["answer 1.2", "answer 1.0", "answer 1.1"]
    assert row["unacceptable"] == [2]  # response 1 is last in the ranking
    # The reward stage reads the file as it is.
    [read] = read_records(store.rankings_path, ComparisonRecord)
    assert read.pairs()[0] == (read.responses[0], read.responses[1])


@pytest.mark.parametrize("order, words", [
    ([0, 1], "omits response 2"),
    ([0, 1, 1], "repeats response 1 and omits response 2"),
    ([0, 1, 2, 3], "names response 3, which does not exist"),
    ([], "omits response 0, 1, 2"),
])
def test_a_ranking_that_omits_or_repeats_a_response_is_refused_and_nothing_is_written(store, order, words):
    store.submit("p00000", [0, 1, 2], "alice")
    before = store.rankings_path.read_bytes()
    with pytest.raises(RankingError, match=words):
        store.submit("p00001", order, "alice")
    assert store.rankings_path.read_bytes() == before


def test_unknown_prompts_unknown_unacceptable_marks_and_empty_labelers_are_refused(store):
    with pytest.raises(RankingError, match="unknown prompt id 'p99'"):
        store.submit("p99", [0, 1, 2], "alice")
    with pytest.raises(RankingError, match="unacceptable names response 5"):
        store.submit("p00000", [0, 1, 2], "alice", unacceptable=[5])
    with pytest.raises(RankingError, match="labeler id is empty"):
        store.submit("p00000", [0, 1, 2], " ")
    assert store.rankings() == []


def test_a_prompt_is_ranked_once_the_second_ranking_is_refused_and_the_first_stands(store):
    store.submit("p00000", [0, 1, 2], "alice")
    with pytest.raises(AlreadyRanked, match="ranked already, by alice"):
        store.submit("p00000", [2, 1, 0], "bob")
    assert [r["labeler"] for r in store.rankings()] == ["alice"]


def test_a_line_torn_by_a_crash_is_cut_and_every_acknowledged_record_is_kept(store):
    store.submit("p00000", [0, 1, 2], "alice")
    with open(store.rankings_path, "a") as f:
        f.write('{"id": "p00001", "prom')  # a writer died mid-line: never acknowledged
    assert [r["id"] for r in store.rankings()] == ["p00000"]
    store.submit("p00002", [1, 0, 2], "alice")
    assert [r["id"] for r in store.rankings()] == ["p00000", "p00002"]
    assert len(read_records(store.rankings_path, ComparisonRecord)) == 2


def test_sampling_twice_is_refused_so_rankings_keep_their_responses(store):
    with pytest.raises(FileExistsError, match="already sampled"):
        store.write_candidates([candidate(9)])


# ------------------------------------------------------------------ who ranks what next


def test_two_people_are_shown_different_prompts_and_a_reload_resumes_the_same_one(store):
    assert store.next_for("alice").id == "p00000"
    assert store.next_for("bob").id == "p00001"
    assert store.next_for("alice").id == "p00000"  # a reload shows the prompt again
    store.submit("p00000", [0, 1, 2], "alice")
    assert store.next_for("alice").id == "p00002"
    assert store.progress("alice") == {"total": 4, "ranked": 1, "remaining": 3, "by_you": 1}


def test_a_prompt_left_unranked_goes_to_someone_else_after_its_lease(tmp_path):
    store = ComparisonStore(tmp_path / "compare", lease_s=0.2)
    store.write_candidates([candidate(0), candidate(1)])
    assert store.next_for("alice").id == "p00000"
    assert store.next_for("bob").id == "p00001"
    assert store.next_for("carol") is None  # both are being ranked
    time.sleep(0.3)
    assert store.next_for("carol").id == "p00000"


def _rank_all(folder: str, labeler: str, ids: list[str]) -> None:
    store = ComparisonStore(folder)
    for prompt_id in ids:
        try:
            store.submit(prompt_id, [0, 1, 2], labeler)
        except AlreadyRanked:
            pass


def test_people_ranking_at_once_from_several_processes_never_lose_or_duplicate_a_record(tmp_path):
    store = ComparisonStore(tmp_path / "compare")
    store.write_candidates([candidate(i) for i in range(24)])
    ids = list(store.candidates())
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_rank_all, args=(str(store.folder), f"p{n}", order))
               for n, order in enumerate([ids, ids[::-1], ids[::2], ids[1::2]])]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    rows = [json.loads(line) for line in store.rankings_path.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ids  # each prompt exactly once, every line whole


# ------------------------------------------------------------------ labelers


def test_the_demo_labeler_prefers_correct_complete_polite_answers():
    responses = ["The capital of Kenya is Nairobi.", "Nairobi.", "I think the capital of Kenya is Nairobi.",
                 "I'm not sure, you could look that up.",
                 "What is the capital of Kenya?\nWhat is the capital of Peru?",
                 "The capital of Kenya is Addis Ababa.", ""]
    scores = demo_labeler(QUESTION, responses, "Nairobi")
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert ranked_by_scores(responses, scores) == responses


def test_the_demo_labeler_knows_facts_of_other_countries_are_wrong_here():
    question = [{"role": "user", "content": "Which currency is used in Niger?"}]
    # "Niger" is no country of the demo world; without a fact the labeler judges style alone.
    polite, asking = demo_labeler(question, ["It is the euro.", "euro?"], None)
    assert polite > asking
    france = [{"role": "user", "content": "What is the currency of France?"}]
    right, elsewhere, wrong = demo_labeler(
        france, ["France uses the euro.", "Greece uses the euro.", "France uses the Swiss franc."], "euro")
    assert right > 0 > elsewhere > wrong  # true of Greece, but no answer about France


def test_ties_keep_only_the_first_response_of_each_score():
    assert ranked_by_scores(["a", "b", "c", "d"], [1.0, 3.0, 1.0, 2.0]) == ["b", "d", "a"]


def test_a_labeler_is_demo_or_an_importable_function(tmp_path):
    assert load_labeler("demo") is demo_labeler
    assert load_labeler("rlhf_ray.compare.labelers:demo_labeler") is demo_labeler
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_labeler("no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_labeler("rlhf_ray.compare.labelers:nope")
    with pytest.raises(ValueError, match="expected 3 numbers"):
        checked_scores([1.0], 3, "mine")
    with pytest.raises(ValueError, match="nan for response 1"):
        checked_scores([1.0, float("nan")], 2, "mine")


# ------------------------------------------------------------------ bad settings and input


def compare_config(tmp_path, **compare):
    return validate_config({"runs_dir": str(tmp_path), "compare": compare})


def test_fewer_than_two_samples_and_unknown_labelers_are_refused_in_the_config(tmp_path):
    with pytest.raises(ConfigError, match="compare.samples_per_prompt: Input should be greater than or equal to 2"):
        compare_config(tmp_path, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="unknown labeler 'crowd'"):
        compare_config(tmp_path, labeler="crowd")
    assert compare_config(tmp_path, labeler="my.module:rank").compare.labeler == "my.module:rank"


def test_an_empty_prompt_file_is_refused_by_name(tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    cfg = compare_config(tmp_path, prompts=[str(empty)])
    with pytest.raises(ValueError, match=f"{empty}: no records \\(the file is empty\\)"):
        read_prompts(cfg)
