"""Encode throughput of our tokenizer: tiktoken vs the same vocabulary through HF `tokenizers`.

Both encoders load the one trained vocabulary (tiktoken from our ranks file, `tokenizers` from the
exported tokenizer.json); they are first checked to give identical ids, then timed side by side on
the demo corpus in one run. Prints a table; the ratio column is throughput / tiktoken's.

    .venv/bin/python bench/tokenizer_throughput.py [--vocab-size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer

from rlhf_ray.config import GPT4_SPLIT_PATTERN, DemoDataConfig
from rlhf_ray.data.demo import write_demo_data
from rlhf_ray.data.readers import read_records
from rlhf_ray.data.records import TextRecord
from rlhf_ray.tokenizer import train_bpe


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=4, help="corpus copies per timed pass")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        files = write_demo_data(Path(tmp) / "data", DemoDataConfig())
        docs = [r.text for r in read_records(files["pretrain"], TextRecord)] * args.copies
        ours = train_bpe(docs, args.vocab_size, GPT4_SPLIT_PATTERN, max_chars=10**9)
        ours.save(Path(tmp) / "tok")
        hf = Tokenizer.from_file(str(Path(tmp) / "tok" / "tokenizer.json"))

    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    threads = os.cpu_count() or 1
    expected = [ours.encode(d) for d in docs]
    assert [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)] == expected, \
        "tiktoken and tokenizers disagree on the ids; the comparison would be meaningless"

    cases = [
        ("tiktoken", "one document at a time", lambda: [ours.encode(d) for d in docs]),
        ("HF tokenizers", "one document at a time",
         lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
        ("tiktoken", f"batch, {threads} threads", lambda: ours.encode_batch(docs, num_threads=threads)),
        ("HF tokenizers", f"batch, {threads} threads",
         lambda: hf.encode_batch(docs, add_special_tokens=False)),
    ]
    print(f"machine: {cpu_name()}, {threads} cores; corpus {megabytes:.2f} MB in {len(docs)} "
          f"documents; vocabulary {ours.vocab_size}; best of {args.repeats}")
    print(f"{'encoder':<15} {'mode':<26} {'MB/s':>8} {'vs tiktoken':>12}")
    baseline: dict[str, float] = {}
    for encoder, mode, fn in cases:
        rate = megabytes / best_seconds(fn, args.repeats)
        baseline.setdefault(mode, rate)
        print(f"{encoder:<15} {mode:<26} {rate:8.2f} {rate / baseline[mode]:11.2f}x")


if __name__ == "__main__":
    main()
