"""Token shards: written by Ray tasks, one per file, deterministic, documents separated by <|endoftext|>."""

import json

import numpy as np
import pytest
import ray

from rlhf_ray.data.shards import open_split, write_shards
from rlhf_ray.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration

DOCS = [f"Document number {i}: the capital of France is Paris. Ça va? 🙂" for i in range(25)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield


@pytest.fixture
def corpus(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tokenizer")
    files = []
    for part in range(3):  # three files: three Ray tasks
        path = tmp_path / f"part{part}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[part::3]))
        files.append(path)
    return files, tmp_path / "tokenizer"


def test_shards_hold_every_document_in_input_order_each_after_the_end_of_text_token(corpus, tmp_path):
    files, tokenizer_dir = corpus
    meta = write_shards(files, tokenizer_dir, tmp_path / "tokens", val_every=4, shard_tokens=300)
    tokenizer = load_tokenizer(tokenizer_dir)
    expected = {"train": [], "val": []}
    for part in range(3):
        for index, doc in enumerate(DOCS[part::3]):
            expected["val" if index % 4 == 3 else "train"] += tokenizer.encode_document(doc)
    for split in ("train", "val"):
        tokens = np.concatenate(open_split(tmp_path / "tokens", split)).tolist()
        assert tokens == expected[split]
        assert meta["splits"][split]["tokens"] == len(tokens)
    assert len(meta["splits"]["train"]["files"]) > 1  # split into shards of at most 300 tokens
    assert meta["dtype"] == "uint16" and meta["documents"] == len(DOCS)


def test_the_same_corpus_gives_the_same_bytes(corpus, tmp_path):
    files, tokenizer_dir = corpus
    write_shards(files, tokenizer_dir, tmp_path / "a")
    write_shards(files, tokenizer_dir, tmp_path / "b")
    for name in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_bad_file_leaves_no_shards_behind(corpus, tmp_path):
    files, tokenizer_dir = corpus
    files[1].write_text('{"text": ""}\n')
    with pytest.raises(Exception, match="part1.jsonl:1: text: empty document"):
        write_shards(files, tokenizer_dir, tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()
