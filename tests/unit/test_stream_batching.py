"""serve.engine.batched: how a reply's deltas are grouped on their way out of a replica."""

import asyncio

import pytest

from serve.engine import batched
from serve.replies import Delta, merge


async def deltas(texts: list[str], every_s: float, fail: bool = False, closed: list | None = None):
    try:
        for i, text in enumerate(texts):
            await asyncio.sleep(every_s)
            yield Delta(0, text, "stop" if i == len(texts) - 1 else None, 3, i + 1)
        if fail:
            raise RuntimeError("engine died")
    finally:
        if closed is not None:
            closed.append(True)


async def collect(stream) -> list[list[str]]:
    return [[d.text for d in batch] async for batch in stream]


def test_deltas_go_at_once_until_text_has_gone_then_in_intervals():
    texts = ["", "", "a", "b", "c", "d", "e", "f"]
    batches = asyncio.run(collect(batched(deltas(texts, 0.01), interval_s=0.035)))
    assert batches[:3] == [[""], [""], ["a"]]  # nothing waits before the first text
    assert sum(batches, []) == texts  # nothing lost, order kept
    assert len(batches) < len(texts) and max(len(b) for b in batches) > 1


def test_an_error_comes_after_what_arrived_before_it():
    async def run() -> tuple[list[str], str]:
        seen: list[str] = []
        with pytest.raises(RuntimeError, match="engine died") as e:
            async for batch in batched(deltas(["a", "b", "c"], 0.01, fail=True), interval_s=0.05):
                seen += [d.text for d in batch]
        return seen, str(e.value)

    assert asyncio.run(run())[0] == ["a", "b", "c"]


def test_closing_the_batches_closes_the_source():
    async def run() -> list:
        closed: list = []
        stream = batched(deltas(["a"] * 100, 0.01, closed=closed), interval_s=0.05)
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.05)
        return closed

    assert asyncio.run(run()) == [True]


def test_merge_joins_a_batch_per_choice():
    batch = [Delta(0, "Par", None, 5, 1), Delta(1, "Lo", None, 5, 1), Delta(0, "is.", "stop", 5, 2)]
    assert merge(batch) == [Delta(0, "Paris.", "stop", 5, 2), Delta(1, "Lo", None, 5, 1)]
