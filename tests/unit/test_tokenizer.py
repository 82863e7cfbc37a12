"""The trained tokenizer: exact round trips, one set of ids in tiktoken and transformers, the chat format."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlhf_ray.config import GPT4_SPLIT_PATTERN, ModelConfig
from rlhf_ray.data.records import Message
from rlhf_ray.modeling import new_policy, save_model
from rlhf_ray.tokenizer import (
    END,
    RANKS_FILE,
    SPECIAL_TOKENS,
    BPETokenizer,
    HFTokenizer,
    load_tokenizer,
    train_bpe,
)

CORPUS = [
    "The capital of France is Paris. French is spoken in France.",
    "Die Hauptstadt von Deutschland ist Berlin. Österreich, Zürich, São Paulo, Reykjavík.",
    "日本の首都は東京です。中国的首都是北京。대한민국의 수도는 서울입니다.",
    "Emoji: 🙂 🚀 🇫🇷 — and code: def area(r):\n    return 3.14159 * r ** 2\n",
] * 50

SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  \n\n\ttabs\r\n",
    "Ça coûte 12,50 € à Genève — naïve façade, Ærø, İstanbul.",
    "東京は日本の首都です。Москва — столица России. ประเทศไทย",
    "Rockets 🚀, flags 🇯🇵🇧🇷, family 👨‍👩‍👧 and ZWJ sequences.",
    "for i in range(10):\n    print(f'{i:>3}')  # comment\n",
    "Numbers 1234567 and 3.14159e-10",
    "",
]

CONVERSATION = [
    Message(role="system", content="You are a helpful assistant."),
    Message(role="user", content="What is the capital of France?"),
    Message(role="assistant", content="The capital of France is Paris."),
    Message(role="user", content="And its main language?"),
    Message(role="assistant", content="The main language of France is French."),
]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return train_bpe(CORPUS, vocab_size=400, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)


@pytest.fixture(scope="module")
def saved(tokenizer: BPETokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(folder)
    return folder


def test_vocabulary_has_the_requested_size_with_special_tokens_last(tokenizer):
    assert tokenizer.vocab_size == 400
    assert [tokenizer.special_ids[t] for t in SPECIAL_TOKENS] == list(range(400 - len(SPECIAL_TOKENS), 400))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_training_merges_frequent_words(tokenizer):
    text = "The capital of France is Paris."
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


@pytest.mark.parametrize("text", SAMPLES)
def test_transformers_gives_the_same_ids_as_tiktoken(tokenizer, saved, text):
    hf = AutoTokenizer.from_pretrained(saved)
    assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf.decode(tokenizer.encode(text)) == text


def test_special_tokens_are_single_ids_in_transformers(tokenizer, saved):
    hf = AutoTokenizer.from_pretrained(saved)
    for token in SPECIAL_TOKENS:
        assert hf.convert_tokens_to_ids(token) == tokenizer.special_ids[token]
    assert hf.pad_token_id == tokenizer.pad_id and hf.eos_token_id == tokenizer.end_id


def test_special_token_text_typed_by_a_user_stays_plain_text(tokenizer):
    ids = tokenizer.encode("<|end|><|assistant|>")
    assert not set(ids) & set(tokenizer.special_ids.values())


def test_chat_template_renders_the_same_ids_as_our_renderer(tokenizer, saved):
    hf = AutoTokenizer.from_pretrained(saved)
    dicts = [m.model_dump() for m in CONVERSATION]
    full = hf.apply_chat_template(dicts, tokenize=True, return_dict=False)
    assert list(full) == tokenizer.render_chat(CONVERSATION)[0]
    prompt = hf.apply_chat_template(dicts[:4], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(prompt) == tokenizer.render_prompt(CONVERSATION[:4])


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    ids, mask = tokenizer.render_chat(CONVERSATION)
    assert len(ids) == len(mask)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == f"The capital of France is Paris.{END}The main language of France is French.{END}"
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "helpful assistant" in untrained and "capital of France?" in untrained
    assert "Paris" not in untrained


def test_prompt_ends_by_asking_for_an_assistant_turn(tokenizer):
    ids = tokenizer.render_prompt(CONVERSATION[:2])
    assert tokenizer.decode(ids).endswith("capital of France?<|end|><|assistant|>")
    assert ids[0] == tokenizer.bos_id


def test_documents_start_with_the_end_of_text_token(tokenizer):
    assert tokenizer.encode_document("Paris") == [tokenizer.bos_id, *tokenizer.encode("Paris")]


def test_saved_folder_loads_back_as_the_same_tokenizer(tokenizer, saved):
    loaded = load_tokenizer(saved)
    assert isinstance(loaded, BPETokenizer)
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)


def test_a_pretrained_models_tokenizer_serves_the_same_interface(tokenizer, saved):
    # HFTokenizer is what a user starting from a Hugging Face model gets; over our own folder it must
    # agree with our renderer, the loss mask included (found by rendering prefix by prefix).
    hf = HFTokenizer(saved)
    assert hf.render_chat(CONVERSATION) == tokenizer.render_chat(CONVERSATION)
    assert hf.render_prompt(CONVERSATION[:2]) == tokenizer.render_prompt(CONVERSATION[:2])
    assert hf.encode_document("Paris") == tokenizer.encode_document("Paris")
    assert hf.vocab_size == tokenizer.vocab_size


def test_a_pretrained_model_stops_at_every_eos_it_lists_and_at_the_turn_end(tokenizer, saved, tmp_path):
    """Like Llama 3 or Qwen: eos is the document end, generation_config.json lists more ids, and the
    chat template closes assistant turns with its own token. A reply must stop at any of them."""
    folder = tmp_path / "pretrained"
    shutil.copytree(saved, folder)
    (folder / RANKS_FILE).unlink()  # a folder without our ranks: loaded as a Hugging Face tokenizer
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"  # not the turn end <|end|>
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    listed = [tokenizer.special_ids["<|user|>"], tokenizer.special_ids["<|system|>"]]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": listed}))
    hf = load_tokenizer(folder)
    assert isinstance(hf, HFTokenizer)
    assert set(hf.stop_ids) == {tokenizer.bos_id, tokenizer.end_id, *listed}

    # save_model writes every one of them back (transformers keeps the list)
    model = new_policy(ModelConfig(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, max_seq_len=64), hf)
    save_model(model, hf, tmp_path / "model")
    saved_eos = json.loads((tmp_path / "model" / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(saved_eos) == sorted(hf.stop_ids)
    assert set(load_tokenizer(tmp_path / "model").stop_ids) == set(hf.stop_ids)


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="vocab_size 200 .* at least 262"):
        train_bpe(CORPUS, vocab_size=200, pattern=GPT4_SPLIT_PATTERN, max_chars=10**9)


def test_a_corrupt_ranks_file_names_file_and_line(tokenizer, saved, tmp_path):
    for name in ("tokenizer.tiktoken", "rlhf_ray_tokenizer.json"):
        (tmp_path / name).write_bytes((saved / name).read_bytes())
    lines = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    lines[2] = "not-base64!"
    (tmp_path / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer.tiktoken:3: expected"):
        load_tokenizer(tmp_path)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
