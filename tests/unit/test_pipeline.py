"""The run folder's first steps (data, tokenizer): filled once, skipped when done, bad input refused.

The training stages and the whole `rlhf-ray pipeline` run on Ray: see tests/integration."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf_ray.cli import main
from rlhf_ray.tokenizer import load_tokenizer

TEST_CONFIG = str(Path(__file__).parents[2] / "configs" / "test.yaml")


def run_cli(*args: str) -> None:
    main(list(args))


def test_the_first_steps_write_config_data_and_tokenizer(tmp_path, capsys):
    run_cli("tokenizer", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}")
    run = tmp_path / "test"
    assert (run / "config.yaml").is_file()
    assert {p.name for p in (run / "data").iterdir()} >= {"pretrain.jsonl", "sft.jsonl", "world.json"}
    tokenizer = load_tokenizer(run / "tokenizer")
    assert tokenizer.vocab_size <= 512
    hf = AutoTokenizer.from_pretrained(run / "tokenizer")
    text = "What is the capital of France?"
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert "records valid" in capsys.readouterr().out


def test_a_rerun_skips_finished_steps_and_changes_nothing(tmp_path, capsys):
    run_cli("tokenizer", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}")
    ranks = tmp_path / "test" / "tokenizer" / "tokenizer.tiktoken"
    before = ranks.stat().st_mtime_ns
    capsys.readouterr()
    run_cli("tokenizer", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}")
    out = capsys.readouterr().out
    assert "data exists, skipped" in out and "tokenizer exists, skipped" in out
    assert ranks.stat().st_mtime_ns == before


def test_a_bad_record_stops_the_run_before_any_work(tmp_path, capsys):
    sft = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]}
    sft.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("pipeline", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}",
                "--set", f"data.sft=[{sft}]")
    assert exit_info.value.code == 2
    assert f"{sft}:2: messages[1].role" in capsys.readouterr().err
    assert not (tmp_path / "test" / "tokenizer").exists()


def test_missing_data_files_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("data", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}", "--set", "data.demo=null",
                "--set", f"data.rl=[{tmp_path / 'prompts.jsonl'}]")
    assert f"{tmp_path / 'prompts.jsonl'}: file not found" in capsys.readouterr().err


def test_a_bad_config_exits_with_the_line_and_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("name: x\ntokenizer:\n  vocab_size: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("pipeline", "--config", str(config))
    assert exit_info.value.code == 2
    assert f"{config}:3: tokenizer.vocab_size: Input should be greater than or equal to 262" in capsys.readouterr().err


def test_own_text_files_train_the_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Lorem ipsum dolor sit amet. " * 200)
    run_cli("tokenizer", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}", "--set", "data.demo=null",
            "--set", f"data.pretrain=[{corpus}]")
    tokenizer = load_tokenizer(tmp_path / "test" / "tokenizer")
    assert len(tokenizer.encode("Lorem ipsum dolor sit amet.")) < 8


def test_no_text_for_the_tokenizer_is_explained(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("tokenizer", "--config", TEST_CONFIG, "--set", f"runs_dir={tmp_path}", "--set", "data.demo=null")
    assert "no pretraining text to train the tokenizer on" in capsys.readouterr().err
    assert not (tmp_path / "test" / "tokenizer").exists()
