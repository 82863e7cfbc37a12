"""serve.engine.tokenizer_info: GET /tokenizer_info's reply, read from a model folder."""

import json

from serve.engine import tokenizer_info


def test_a_run_folder_gives_its_special_tokens_chat_template_and_the_served_context(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    info = tokenizer_info(tmp_path, max_len=512)
    assert info["bos_token"] == "<|endoftext|>" and info["eos_token"] and info["pad_token"]
    assert "{{ bos_token }}" in info["chat_template"]
    assert info["model_max_length"] == 512  # the engine's context, not the config's 2**30
    assert json.loads(json.dumps(info)) == info


def test_a_pretrained_folder_gives_token_texts_not_objects_and_no_file_paths(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "vocab_file": "/somewhere/tokenizer.model",
        "bos_token": {"content": "<s>", "lstrip": False, "__type": "AddedToken"},
        "added_tokens_decoder": {"0": {"content": "<unk>"}}, "model_max_length": 4096}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    info = tokenizer_info(tmp_path, max_len=2048)
    assert info == {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                    "model_max_length": 2048, "chat_template": "{{ messages }}"}


def test_a_folder_without_a_tokenizer_config_still_answers(tmp_path):
    assert tokenizer_info(tmp_path, max_len=128) == {"model_max_length": 128}
