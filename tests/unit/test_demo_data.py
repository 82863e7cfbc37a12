"""The demo data generator: deterministic, held-out countries really held out, facts learnable."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rlhf_ray.config import DemoDataConfig
from rlhf_ray.data.demo import ATTRIBUTES, fact, split_countries, write_demo_data
from rlhf_ray.data.readers import read_records
from rlhf_ray.data.records import ChatRecord, ComparisonRecord, PromptRecord, TextRecord
from rlhf_ray.data.world import CONTINENTS, COUNTRIES

FILES = ("pretrain", "sft", "sft_eval", "reward", "reward_eval", "rl", "rl_eval", "compare")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_demo_data(tmp_path_factory.mktemp("demo"), DemoDataConfig())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pretraining_text(demo: dict[str, Path]) -> str:
    return "\n\n".join(r["text"] for r in rows(demo["pretrain"]))


def test_world_facts_are_well_formed() -> None:
    assert 55 <= len(COUNTRIES) <= 70
    assert COUNTRIES[0].name == "France"
    assert {c.continent for c in COUNTRIES} == set(CONTINENTS)
    by_name = {c.name: c for c in COUNTRIES}
    assert len(by_name) == len(COUNTRIES)
    assert len({c.capital for c in COUNTRIES}) == len(COUNTRIES)
    capitals = {"France": "Paris", "Australia": "Canberra", "Canada": "Ottawa", "Brazil": "Brasília",
                "Turkey": "Ankara", "Switzerland": "Bern", "Nigeria": "Abuja", "Japan": "Tokyo"}
    for name, capital in capitals.items():
        assert by_name[name].capital == capital
    # The held-out checks below search text for names: no name may hide inside another one.
    for a in COUNTRIES:
        for b in COUNTRIES:
            if a != b:
                assert a.name not in b.name and a.name not in b.capital, (a.name, b.name)
    assert by_name["China"].population_text == "1.41 billion"
    assert by_name["France"].population_text == "68 million"
    assert by_name["Norway"].population_text == "5.6 million"
    assert by_name["Iceland"].population_text == "390,000"


def test_same_config_gives_identical_bytes_and_another_seed_another_split(tmp_path: Path) -> None:
    first = write_demo_data(tmp_path / "a", DemoDataConfig())
    second = write_demo_data(tmp_path / "b", DemoDataConfig())
    assert set(first) == set(FILES)
    for name in FILES:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    assert (tmp_path / "a/world.json").read_bytes() == (tmp_path / "b/world.json").read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
    assert split_countries(DemoDataConfig(seed=1)) != split_countries(DemoDataConfig(seed=0))


@pytest.mark.parametrize("num_countries", [None, 10])
@pytest.mark.parametrize("seed", range(5))
def test_split_is_disjoint_with_france_in_sft(seed: int, num_countries: int | None) -> None:
    cfg = DemoDataConfig(seed=seed, num_countries=num_countries)
    split = split_countries(cfg)
    names = {part: {c.name for c in members} for part, members in split.items()}
    assert "France" in names["sft"]
    assert not names["sft"] & names["rl"] and not names["sft"] & names["eval"]
    assert not names["rl"] & names["eval"]
    assert sum(len(v) for v in names.values()) == len(COUNTRIES[: num_countries or len(COUNTRIES)])
    assert names["rl"] and names["eval"]


def test_world_json_records_the_split(demo: dict[str, Path]) -> None:
    world = json.loads((demo["pretrain"].parent / "world.json").read_text(encoding="utf-8"))
    split = split_countries(DemoDataConfig())
    assert world["split"] == {part: [c.name for c in members] for part, members in split.items()}
    assert {c["name"]: c["capital"] for c in world["countries"]}["France"] == "Paris"


def test_held_out_countries_never_appear_in_training_files(demo: dict[str, Path]) -> None:
    split = split_countries(DemoDataConfig())
    training = {name: demo[name].read_text(encoding="utf-8") for name in ("sft", "reward", "rl", "compare")}
    for country in split["rl"] + split["eval"]:
        for name in ("sft", "reward", "compare"):  # compare: the prompts whose SFT samples are ranked
            assert country.name not in training[name], (country.name, name)
            assert country.capital not in training[name], (country.capital, name)
    for country in split["eval"]:
        assert country.name not in training["rl"] and country.capital not in training["rl"]
    # ...while the eval files are about the eval countries.
    eval_names = {c.name for c in split["eval"]}
    for record in rows(demo["rl_eval"]):
        assert any(name in record["prompt"] for name in eval_names)


def test_every_country_is_in_pretraining_with_its_capital(demo: dict[str, Path]) -> None:
    lines = pretraining_text(demo).splitlines()
    for country in COUNTRIES:
        assert any(country.name in line and country.capital in line for line in lines), country.name
    # The SFT answer's phrasing is in pretraining too, so held-out answers can be completed.
    text = "\n".join(lines)
    for country in COUNTRIES:
        assert f"The capital of {country.name} is {country.capital}." in text, country.name


def test_quiz_sheets_have_bare_questions_on_consecutive_lines(demo: dict[str, Path]) -> None:
    def question_run(text: str) -> int:
        longest = run = 0
        for line in text.splitlines():
            run = run + 1 if line.endswith("?") and not line.startswith("Q:") else 0
            longest = max(longest, run)
        return longest

    quiz_sheets = [r["text"] for r in rows(demo["pretrain"]) if question_run(r["text"]) >= 5]
    assert len(quiz_sheets) >= len(COUNTRIES)
    assert all("\n\nAnswers\n\n" in sheet for sheet in quiz_sheets)
    assert any("What is the capital of France?\n" in sheet for sheet in quiz_sheets)


def test_conversations_alternate_and_end_with_the_assistant(demo: dict[str, Path]) -> None:
    multi_turn = with_system = 0
    for name in ("sft", "sft_eval"):
        for record in rows(demo[name]):
            roles = [m["role"] for m in record["messages"]]
            if roles[0] == "system":
                with_system += 1
                roles = roles[1:]
            assert roles == ["user", "assistant"] * (len(roles) // 2), roles
            assert all(m["content"].strip() for m in record["messages"])
            multi_turn += len(roles) > 2
    assert multi_turn > 0 and with_system > 0
    answers = {m["content"] for r in rows(demo["sft"]) for m in r["messages"] if m["role"] == "assistant"}
    assert "The capital of France is Paris." in answers


def test_comparisons_prefer_the_correct_answer(demo: dict[str, Path]) -> None:
    pairs = ranked = 0
    for name in ("reward", "reward_eval"):
        for record in rows(demo[name]):
            if "chosen" in record:
                pairs += 1
                assert record["chosen"] != record["rejected"]
            else:
                ranked += 1
                assert 3 <= len(record["responses"]) <= 4
                assert len(set(record["responses"])) == len(record["responses"])
    assert pairs > 0 and ranked > 0
    france = [r for r in rows(demo["reward"]) if "capital of France" in r["prompt"]]
    assert france
    for record in france:
        best = record.get("chosen") or record["responses"][0]
        assert "Paris" in best and best.endswith(".")


def test_rl_ground_truth_is_written_next_to_its_country_in_pretraining(demo: dict[str, Path]) -> None:
    lines = pretraining_text(demo).splitlines()
    by_name = {c.name: c for c in COUNTRIES}
    for name in ("rl", "rl_eval"):
        for record in rows(demo[name]):
            country = next(c for n, c in by_name.items() if n in record["prompt"])
            assert record["ground_truth"] in {fact(country, a) for a in ATTRIBUTES}
            assert any(country.name in line and record["ground_truth"] in line for line in lines), record


def test_corpus_has_accents_and_other_scripts(demo: dict[str, Path]) -> None:
    text = pretraining_text(demo)
    for sample in ("España", "Ísland", "Brasília", "日本", "中国", "대한민국", "Ελλάδα", "Россия", "ประเทศไทย"):
        assert sample in text, sample
    assert "\\u" not in demo["pretrain"].read_text(encoding="utf-8")


def test_default_size_and_speed(tmp_path: Path) -> None:
    start = time.perf_counter()
    paths = write_demo_data(tmp_path, DemoDataConfig())
    seconds = time.perf_counter() - start
    corpus = sum(len(r["text"].encode()) for r in rows(paths["pretrain"]))
    counts = {name: len(rows(path)) for name, path in paths.items()}
    # Default config, measured: 378 documents, ~226 KB of pretraining text, all files in ~0.03 s.
    print(f"\npretraining corpus: {corpus / 1000:.0f} KB; records: {counts}; generated in {seconds:.3f} s")
    assert corpus > 0


def test_every_generated_file_reads_as_records(demo: dict[str, Path]) -> None:
    kinds = {"pretrain": TextRecord, "sft": ChatRecord, "sft_eval": ChatRecord, "reward": ComparisonRecord,
             "reward_eval": ComparisonRecord, "rl": PromptRecord, "rl_eval": PromptRecord,
             "compare": PromptRecord}
    for name, kind in kinds.items():
        assert len(read_records(demo[name], kind)) == len(rows(demo[name]))


def test_the_canonical_answer_repeats_the_countrys_name_as_the_question_writes_it() -> None:
    """The tokenizer writes a word that opens a text differently from the same word after a space
    ("Germany" vs " Germany"). An answer that opens with the country's name makes the model turn
    the question's " Germany" into another token, which it learns only for the SFT countries: on
    held-out ones the demo's SFT model answered "Which continent is Cambodia in?" with "Portugal
    is in Europe." (3 of 23 right), though given "Cambodia" it went on "is in Asia." (23 of 23)."""
    import regex

    from rlhf_ray.config import GPT4_SPLIT_PATTERN
    from rlhf_ray.data.demo import QUESTIONS, STATEMENTS

    for attribute in ATTRIBUTES:
        for country in COUNTRIES:
            answer = STATEMENTS[attribute][0].format(n=country.name, v=fact(country, attribute))
            name = regex.findall(GPT4_SPLIT_PATTERN, f"which {country.name}")[1:]  # as questions write it
            pieces = regex.findall(GPT4_SPLIT_PATTERN, answer)
            assert any(pieces[i : i + len(name)] == name for i in range(len(pieces))), (attribute, answer)
            for template in QUESTIONS[attribute]:
                asked = regex.findall(GPT4_SPLIT_PATTERN, template.format(n=country.name))
                assert any(asked[i : i + len(name)] == name for i in range(len(asked))), template
