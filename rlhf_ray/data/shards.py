"""Token shards for pretraining: the corpus tokenized once into flat binary files.

    data/tokens/meta.json            vocab size, dtype, the files of each split, token counts
    data/tokens/train_00000.bin ...  documents back to back, each starting with <|endoftext|>
    data/tokens/val_00000.bin ...    every `val_every`-th document of each file (10%), for the eval loss

Files are tokenized in parallel, one Ray task per input file; the shards are written in input
order, so the same corpus and tokenizer always give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_ray.storage import atomic_folder
from rlhf_ray.tokenizer import load_tokenizer

META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_file(path: Path, tokenizer_dir: Path, val_every: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(train tokens, val tokens, documents) of one file: each document is <bos> + its ids."""
    from rlhf_ray.data.readers import read_records
    from rlhf_ray.data.records import TextRecord

    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    train: list[int] = []
    val: list[int] = []
    records = read_records(path, TextRecord)
    for index, record in enumerate(records):
        (val if val_every and index % val_every == val_every - 1 else train).extend(
            tokenizer.encode_document(record.text))
    return np.array(train, dtype=dtype), np.array(val, dtype=dtype), len(records)


def write_shards(files: list[Path], tokenizer_dir: Path, out: Path, val_every: int = 10,
                 shard_tokens: int = 1 << 27) -> dict:
    """Tokenize `files` into `out` (created only when complete) with Ray tasks; return its meta."""
    import ray  # here, not at the top: training workers read shards without Ray installed
    from tqdm import tqdm

    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    task = ray.remote(tokenize_file)
    pending = [task.remote(Path(f), Path(tokenizer_dir), val_every) for f in files]
    meta: dict = {"vocab_size": vocab_size, "dtype": token_dtype(vocab_size).name,
                  "sources": [str(f) for f in files], "val_every": val_every, "documents": 0,
                  "splits": {"train": {"files": [], "tokens": 0}, "val": {"files": [], "tokens": 0}}}
    writers = {split: _ShardWriter(split, shard_tokens) for split in ("train", "val")}
    with atomic_folder(out) as tmp:
        for ref in tqdm(pending, desc="tokenizing", unit="file", disable=len(pending) < 2):
            train, val, documents = ray.get(ref)  # in input order: deterministic output
            writers["train"].add(tmp, train)
            writers["val"].add(tmp, val)
            meta["documents"] += documents
        for split, writer in writers.items():
            writer.close(tmp)
            meta["splits"][split] = {"files": writer.names, "tokens": writer.total}
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return meta


class _ShardWriter:
    def __init__(self, split: str, shard_tokens: int) -> None:
        self.split, self.shard_tokens = split, shard_tokens
        self.names: list[str] = []
        self.total = 0
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, folder: Path, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        self.total += len(tokens)
        while self.buffered >= self.shard_tokens:
            joined = np.concatenate(self.buffer)
            self._write(folder, joined[: self.shard_tokens])
            rest = joined[self.shard_tokens:]
            self.buffer, self.buffered = [rest], len(rest)

    def close(self, folder: Path) -> None:
        if self.buffered:
            self._write(folder, np.concatenate(self.buffer))
        self.buffer, self.buffered = [], 0

    def _write(self, folder: Path, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.names):05d}.bin"
        tokens.tofile(folder / name)
        self.names.append(name)


def open_split(folder: Path, split: str) -> list[np.memmap]:
    """The shards of a split, memory-mapped (nothing is read until used)."""
    meta_path = Path(folder) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META}; tokenize the corpus first")
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    return [np.memmap(Path(folder) / name, dtype=dtype, mode="r") for name in meta["splits"][split]["files"]]
