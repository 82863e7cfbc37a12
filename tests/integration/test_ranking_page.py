"""People rank sampled answers on the ranking page that `rlhf-ray compare-data` serves on Ray
Serve, in headless Chromium; the command returns once every prompt is ranked."""

import json
import socket
import threading
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf_ray.cli import main
from rlhf_ray.compare.store import Candidate, ComparisonStore
from rlhf_ray.data.readers import read_records
from rlhf_ray.data.records import ComparisonRecord
from tests.browser import new_page

pytestmark = pytest.mark.integration

TEST_CONFIG = Path(__file__).parents[2] / "configs" / "test.yaml"
QUESTIONS = ["What is the capital of Kenya?", "Which language is spoken in Peru?",
             "What is the currency of Japan?", "Where is France located?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_for(url: str, timeout_s: float = 240) -> None:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


def rank_in_browser(page, order: list[int], unacceptable: int | None = None) -> str:
    """Click the answers in `order` (indices of the candidate's responses), submit; returns the
    prompt id that was ranked."""
    page.wait_for_selector(".response")
    prompt = page.locator("#prompt").inner_text()
    for index in order:
        page.click(f'.response[data-index="{index}"] .text')
    if unacceptable is not None:
        page.check(f'.response[data-index="{unacceptable}"] .unacceptable')
    assert page.locator(f'.response[data-index="{order[0]}"] .rank').inner_text() == "1st"
    page.click("#submit")
    page.wait_for_function("(p) => document.querySelector('#prompt').innerText !== p "
                           "|| document.querySelector('#done').style.display === 'block'", arg=prompt)
    return prompt


def people_rank(base: str, store: ComparisonStore, chosen: dict, errors: list) -> None:
    """What two people do while the command serves the page (runs in a thread)."""
    try:
        wait_for(f"{base}/rank/api/progress")
        api = f"{base}/rank/api"
        # Bad rankings are refused with the reason, and nothing is written.
        first = call(f"{api}/next?labeler=bob")[1]
        for order, words in (([0, 1], "omits response 2"), ([0, 0, 1], "repeats response 0")):
            status, body = call(f"{api}/rankings", {"prompt_id": first["prompt_id"], "labeler": "bob",
                                                    "order": order})
            assert status == 400 and words in body["error"]["message"], body
        assert call(f"{api}/next?labeler=no%20spaces!")[0] == 400
        assert not store.rankings_path.exists()

        with new_page(f"{base}/rank/") as page:
            page.fill("#labeler", "alice")
            page.dispatch_event("#labeler", "change")
            chosen[rank_in_browser(page, [2, 0, 1])] = ([2, 0, 1], [])
            chosen[rank_in_browser(page, [1, 2, 0], unacceptable=0)] = ([1, 2, 0], [2])
            page.reload()  # the id is remembered; the page goes on where alice left off
            chosen[rank_in_browser(page, [0, 2, 1])] = ([0, 2, 1], [])
        rows = [json.loads(line) for line in store.rankings_path.read_text().splitlines()]
        assert len(rows) == 3, rows  # exactly three records
        # bob was shown another prompt all along; alice's prompts are taken.
        assert first["prompt_id"] not in {r["id"] for r in rows}
        status, body = call(f"{api}/rankings", {"prompt_id": rows[0]["id"], "labeler": "bob",
                                                "order": [0, 1, 2]})
        assert status == 409 and "ranked already, by alice" in body["error"]["message"]
        status, body = call(f"{api}/rankings", {"prompt_id": first["prompt_id"], "labeler": "bob",
                                                "order": [2, 1, 0]})
        assert status == 200 and body["progress"]["remaining"] == 0
    except BaseException:
        errors.append(traceback.format_exc())
        finish(store)


def finish(store: ComparisonStore) -> None:
    """After a failure: rank what is left, so the command (which waits for that) returns."""
    ranked = {r["id"] for r in store.rankings()}
    for candidate in store.candidates().values():
        if candidate.id not in ranked:
            store.append(candidate, candidate.responses, "test-teardown")


def test_people_rank_on_the_page_served_by_compare_data_until_every_prompt_is_ranked(tmp_path, capsys):
    port = free_port()
    overrides = ["--set", f"runs_dir={tmp_path}", "--set", f"serve.port={port}",
                 "--set", "compare.labeler=human", "--set", "serve.start_timeout_s=180"]
    store = ComparisonStore(tmp_path / "test" / "compare")
    candidates = [Candidate(id=f"p{i:05d}", prompt=[{"role": "user", "content": q}],
                            responses=[f"{q} Answer {j}." for j in range(3)])
                  for i, q in enumerate(QUESTIONS)]
    store.write_candidates(candidates)  # sampled already: the command goes straight to ranking
    chosen: dict[str, tuple[list[int], list[int]]] = {}
    errors: list[str] = []
    people = threading.Thread(target=people_rank,
                              args=(f"http://127.0.0.1:{port}", store, chosen, errors))
    people.start()
    main(["compare-data", "--config", str(TEST_CONFIG), *overrides])  # returns when all are ranked
    people.join()
    assert not errors, errors[0]
    out = capsys.readouterr().out
    assert f"rank the samples at http://127.0.0.1:{port}/rank/ (4 prompts left)" in out

    by_prompt = {c.prompt[0].content: c for c in candidates}
    records = read_records(store.rankings_path, ComparisonRecord)
    assert [r.labeler for r in records] == ["alice", "alice", "alice", "bob"]
    for record in records[:3]:
        question = record.prompt[0].content
        order, unacceptable = chosen[f"user: {question}"]
        assert [r[0].content for r in record.responses] == [by_prompt[question].responses[i] for i in order]
        assert record.unacceptable == unacceptable
