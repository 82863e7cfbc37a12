"""The Ray Serve app on a local Ray with tiny checkpoints, driven by the official `openai` client:
chat and completions, streamed and not, and every kind of bad request answered with OpenAI's
error JSON while the server keeps answering."""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from ray import serve as ray_serve

from rlhf_ray.data.records import Message
from rlhf_ray.modeling import load_policy, load_scalar_model, save_model
from rlhf_ray.tokenizer import load_tokenizer
from serve.cpus import to_move
from serve.deployment import deployment_name, stage_app
from serve.run import start
from tests.browser import new_page

pytestmark = pytest.mark.integration

from tests.served import AUTH, KEY, QUESTION, REPO, chat_model
from tests.tiny import FACTS


def test_models_lists_the_stages_of_the_run(client):
    assert sorted(m.id for m in client.models.list()) == ["base", "reward", "rlhf", "sft"]


def test_chat_completion_and_its_stream_agree(client, tiny_policy_dir):
    reply = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "sft"
    assert choice.message.role == "assistant" and choice.message.content == "Paris."
    assert choice.finish_reason == "stop"  # at <|end|>, which the reply does not show
    reply_tokens = len(load_tokenizer(tiny_policy_dir).encode("Paris.")) + 1  # and <|end|>
    assert reply.usage.completion_tokens == reply_tokens and reply.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model="sft", messages=QUESTION, temperature=0,
                                                 max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_the_base_model_continues_a_document(client):
    prompt = FACTS[: FACTS.index(" Lima")]  # "The capital of France is Paris. ... of Peru is"
    completion = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=3)
    assert completion.object == "text_completion"
    assert completion.choices[0].text.startswith(" Lima")  # the tiny model memorised FACTS
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt=prompt, temperature=0, max_tokens=3, stream=True))
    assert streamed == completion.choices[0].text


def test_sampling_options_n_seed_and_stop(client):
    kwargs = dict(model="base", prompt="The capital of", max_tokens=8, temperature=1.0, seed=7)
    first = client.completions.create(n=2, **kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    again = client.completions.create(n=2, **kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    stopped = client.completions.create(model="base", prompt="The capital of France is",
                                        temperature=0, max_tokens=20, stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, status, param, message", [
    ({"model": "gpt-4", "messages": QUESTION}, 404, "model", "model 'gpt-4' does not exist"),
    ({"model": "sft", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role",
     "Input should be 'system', 'developer', 'user' or 'assistant'"),
    ({"model": "sft", "messages": QUESTION, "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ({"model": "sft", "messages": QUESTION, "n": 9}, 400, "n", "less than or equal to 8"),
    ({"model": "sft", "messages": QUESTION, "temprature": 0}, 400, "temprature",
     "not a field this server takes"),
    ({"model": "sft", "messages": []}, 400, "messages", "at least 1 item"),
    ({"model": "sft", "messages": [{"role": "user", "content": "Paris " * 400}]}, 400, "messages",
     "has a context of 512 tokens"),
    ({"model": "sft", "messages": QUESTION, "max_tokens": 10_000}, 400, "max_tokens",
     "exceed the context of 512"),
    ({"model": "sft", "messages": QUESTION + [{"role": "assistant", "content": "x"}]}, 400,
     "messages", "the last message must be the user's"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(url, client, body, status,
                                                                      param, message):
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=2).choices


def test_malformed_json_is_a_400(url):
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{not json",
                          headers={"Content-Type": "application/json", **AUTH}, timeout=60)
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


def test_health_and_readiness(url):
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready", timeout=30).json()["models"] == ["base", "rlhf", "sft", "reward"]
    assert httpx.get(f"{url}/sft/ready", timeout=30).json()["models"] == ["sft"]


def test_not_ready_while_a_stage_has_no_replica_to_answer(url):
    """A router whose `ghost` stage has no replica (as while a stage's engine still loads, its
    app deployed after the router's) is not ready, and says which model it waits for; the
    stages that answer do not hold it back elsewhere."""
    from serve.ingress import Router

    ray_serve.run(Router.bind(["sft", "ghost"], None, None, 8192), name="ready-probe",
                  route_prefix="/ready-probe")
    try:
        response = httpx.get(f"{url}/ready-probe/ready", timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json() == {"status": "starting", "waiting": ["ghost"]}
        assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
    finally:
        ray_serve.delete("ready-probe")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_without_the_api_key_every_route_but_health_is_refused(url, headers):
    for method, route in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                          ("POST", "/v1/score")):
        response = httpx.request(method, f"{url}{route}", headers=headers, timeout=30,
                                 json={"model": "sft", "messages": QUESTION})
        assert response.status_code == 401, route
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200


def test_a_body_over_the_limit_is_refused_with_413(url, client):
    big = {"model": "sft", "messages": [{"role": "user", "content": "x" * 10_000}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=big, headers=AUTH, timeout=30)
    assert response.status_code == 413 and "the limit is 8192" in response.json()["error"]["message"]
    assert client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=2).choices


def test_the_reward_model_scores_a_conversation_and_ranks_candidates(url, tiny_reward_dir):
    candidates = ["Paris.", "Lima, I think.", "The capital of France is Paris."]
    ranked = httpx.post(f"{url}/v1/score", headers=AUTH, timeout=60, json={
        "model": "reward", "messages": QUESTION, "candidates": candidates}).json()
    assert sorted(ranked["ranking"]) == [0, 1, 2]
    assert [ranked["scores"][i] for i in ranked["ranking"]] == sorted(ranked["scores"], reverse=True)

    # The same numbers as the reward model scored in this process.
    tokenizer, model = load_tokenizer(tiny_reward_dir), load_scalar_model(tiny_reward_dir).eval()
    for candidate, served in zip(candidates, ranked["scores"]):
        ids, _ = tokenizer.render_chat([Message(**QUESTION[0]), Message(role="assistant", content=candidate)])
        with torch.no_grad():
            assert model(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(served, abs=1e-4)
        one = httpx.post(f"{url}/v1/score", headers=AUTH, timeout=60, json={
            "messages": QUESTION + [{"role": "assistant", "content": candidate}]}).json()
        assert one["scores"] == [pytest.approx(served, abs=1e-5)]


@pytest.mark.parametrize("body, status, message", [
    ({"messages": QUESTION}, 400, "the last message must be the assistant's reply"),
    ({"messages": QUESTION + [{"role": "assistant", "content": "x"}], "candidates": ["y"]}, 400,
     "with candidates, the last message must be the user's"),
    ({"model": "sft", "messages": QUESTION, "candidates": ["y"]}, 404, "model 'sft' does not exist"),
    ({"messages": QUESTION, "candidates": []}, 400, "at least 1 item"),
])
def test_bad_score_requests(url, body, status, message):
    response = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status and message in response.json()["error"]["message"]


# --------------------------------------------------------------------------- the chat page


@pytest.fixture
def page(url):
    with new_page(f"{url}/") as page:
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        page.fill("#temperature", "0")  # greedy: the replies are known
        yield page


def test_the_chat_page_streams_a_chat_with_the_chosen_stage(page):
    page.select_option("#model", "sft")
    page.fill("#prompt", QUESTION[0]["content"])
    page.click("#send")
    page.wait_for_function("document.querySelector('#send').disabled === false "
                           "&& document.querySelectorAll('.assistant').length === 1", timeout=60_000)
    assert page.inner_text(".user") == "You: " + QUESTION[0]["content"]
    assert page.inner_text(".assistant") == "Paris."


def test_the_ranking_page_is_served_beside_the_chat_page_behind_the_same_key(page, url):
    page.wait_for_selector("#rank:not([hidden])")  # the chat page links to it
    assert httpx.get(f"{url}/rank/api/progress", timeout=30).status_code == 401
    progress = httpx.get(f"{url}/rank/api/progress", headers=AUTH, timeout=30).json()
    assert progress == {"total": 1, "ranked": 0, "remaining": 1, "by_you": 0}
    assert "rlhf-ray ranking" in httpx.get(f"{url}/rank/", timeout=30).text


def test_the_chat_page_compares_three_stages_with_the_reward_models_scores(page, url):
    page.check("#compare")
    page.fill("#prompt", QUESTION[0]["content"])
    page.click("#send")
    page.wait_for_function("[...document.querySelectorAll('.column .score')].length === 3 && "
                           "[...document.querySelectorAll('.column .score')]"
                           ".every(e => e.textContent.startsWith('reward '))", timeout=60_000)
    columns = {c.get_attribute("data-model"): c for c in page.query_selector_all(".column")}
    assert sorted(columns) == ["base", "rlhf", "sft"]
    replies = {m: c.query_selector(".reply").inner_text() for m, c in columns.items()}
    assert replies["sft"] == replies["rlhf"] == "Paris."  # the same tiny chat model
    base = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "base", "messages": QUESTION, "temperature": 0, "max_tokens": 64}).json()
    assert replies["base"] == base["choices"][0]["message"]["content"].strip()
    scores = {m: float(c.query_selector(".score").inner_text().split()[1]) for m, c in columns.items()}
    assert scores["sft"] == pytest.approx(scores["rlhf"], abs=1e-3)


def test_the_terminal_client_keeps_the_conversation_and_shows_errors(url):
    session = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "chat", "--url", url, "--model", "sft",
         "--temperature", "0", "--api-key", KEY],
        input=f"{QUESTION[0]['content']}\n/reset\n{'Paris ' * 400}\n", capture_output=True,
        text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert session.returncode == 0, session.stderr[-2000:]
    lines = session.stdout.splitlines()
    assert lines[0] == "sft> Paris."
    assert lines[1].startswith("sft> [error: the prompt is") and "context of 512 tokens" in lines[1]


def long_completion(url: str, model: str, max_tokens: int = 400) -> dict:
    """A sampled completion request that runs to max_tokens (its seed found by trying): the
    request stays in flight for a while, deterministically."""
    for seed in range(40):
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
                "temperature": 2.0, "seed": seed}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120).json()
        if reply["choices"][0]["finish_reason"] == "length":
            return body
    pytest.fail(f"no seed in 0..39 makes {model} write {max_tokens} tokens without stopping")


def stream(url: str, body: dict, events: list | None = None) -> dict:
    """Send a streaming completion and read it to the end: status, error, text, finish reason,
    and when the response began and ended."""
    began = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=300) as response:
        answered = time.monotonic()
        if response.status_code != 200:
            response.read()
            json_body = response.headers.get("content-type", "").startswith("application/json")
            return {"status": response.status_code,
                    "error": response.json()["error"] if json_body else response.text,
                    "retry_after": response.headers.get("retry-after"), "began": began,
                    "answered": answered, "ended": time.monotonic()}
        text, finish = "", None
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text, finish = text + choice["text"], choice["finish_reason"] or finish
                if events is not None:
                    events.append(time.monotonic())
    return {"status": 200, "text": text, "finish_reason": finish, "began": began,
            "answered": answered, "ended": time.monotonic()}


def stage_stats(stage: str) -> dict:
    return ray_serve.get_deployment_handle(deployment_name(stage), app_name=stage_app(stage).name).stats.remote().result()


# The router answers overload in OpenAI's error JSON; at a stage's own URL, Serve's HTTP proxy
# refuses before the stage's replica sees the request, with its own text.
@pytest.mark.parametrize("prefix", ["", "/base"], ids=["router", "stage"])
def test_overload_is_answered_503_at_once_and_the_accepted_requests_finish(url, prefix):
    body = long_completion(url, "base")
    with ThreadPoolExecutor(8) as pool:  # 2 run, 2 wait in the queue, the rest are refused
        results = list(pool.map(lambda _: stream(url + prefix, body), range(8)))
    accepted = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] != 200]
    # About the 2 running and 2 queued are taken: Serve's queue count is not exact under a burst
    # (3 and 5 taken in CI runs, its log once counting 3 queued of at most 2).
    assert len(accepted) >= 2 and len(refused) >= 1
    for r in refused:
        assert r["status"] == 503 and r["retry_after"] == "1"
        if prefix:
            assert "dropped due to backpressure" in r["error"]
        else:
            assert r["error"]["code"] == "overloaded" and "'base' is overloaded" in r["error"]["message"]
        assert r["ended"] < min(a["ended"] for a in accepted)  # refused, not left to pile up
    assert all(a["finish_reason"] == "length" for a in accepted)
    assert len({a["text"] for a in accepted}) == 1  # one seed, one text: none was cut short
    assert stream(url + prefix, body)["status"] == 200


@pytest.mark.parametrize("prefix", ["", "/base"], ids=["router", "stage"])
def test_a_client_that_disconnects_aborts_its_generation(url, prefix):
    body = long_completion(url, "base")
    before = stage_stats("base")
    with httpx.stream("POST", f"{url}{prefix}/v1/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=60) as response:
        next(response.iter_lines())  # the first chunk; then the client goes away
    deadline = time.monotonic() + 30
    while (now := stage_stats("base"))["aborted"] == before["aborted"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now["aborted"] == before["aborted"] + 1 and now["running"] == 0


# Last in this file: it points the rlhf deployment at another model.
def test_pointing_a_stage_at_a_new_folder_reloads_it_in_place_without_dropping_requests(
        served, tiny_policy_dir, tmp_path):
    url, cfg = served
    berlin = tmp_path / "rlhf-v2"
    save_model(chat_model(tiny_policy_dir, "Berlin."), load_tokenizer(tiny_policy_dir), berlin)
    new_answer = greedy_reply(berlin, QUESTION, max_tokens=8)
    assert new_answer != "Paris."
    replicas = {stage: stage_stats(stage)["replica"] for stage in ("base", "sft", "rlhf")}
    workers_cores = cores_of("VLLM::Worker")
    long_body = long_completion(url, "rlhf", max_tokens=200)
    long_events: list[float] = []
    replies: list[tuple[float, int, str]] = []  # (sent at, status, reply) of a steady stream of chats
    stop = threading.Event()

    def chat_steadily() -> None:  # at the stage's own URL; the long completion goes by the router
        while not stop.is_set():
            sent = time.monotonic()
            r = httpx.post(f"{url}/rlhf/v1/chat/completions", headers=AUTH, timeout=300, json={
                "model": "rlhf", "messages": QUESTION, "temperature": 0, "max_tokens": 8})
            replies.append((sent, r.status_code, r.json()["choices"][0]["message"]["content"]
                            if r.status_code == 200 else r.text))

    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(stream, url, long_body, long_events)
        chats = pool.submit(chat_steadily)
        while not long_events:
            time.sleep(0.01)
        reload_began = time.monotonic()
        start(cfg.run_dir, cfg.model_copy(update={"serve": cfg.serve.model_copy(
            update={"folders": {"rlhf": berlin}})}))
        reload_done = time.monotonic()
        while not any(sent > reload_done for sent, _, _ in replies):
            time.sleep(0.1)
        stop.set()
        long_reply = in_flight.result()
        chats.result()

    assert long_reply["status"] == 200 and long_reply["finish_reason"] == "length"
    assert long_events[-1] > reload_began  # it was still streaming when the reload began
    assert all(status == 200 for _, status, _ in replies), replies
    assert {reply for _, _, reply in replies} <= {"Paris.", new_answer}
    assert replies[0][2] == "Paris."
    assert all(reply == new_answer for sent, _, reply in replies if sent > reload_done)
    stats = stage_stats("rlhf")
    assert stats["folder"] == str(berlin.resolve()) and stats["reloads"] == 1
    assert {stage: stage_stats(stage)["replica"] for stage in replicas} == replicas  # not restarted
    # the new engine started on every core (vLLM bound its worker as before), then left them
    assert cores_of("VLLM::Worker") == workers_cores
    assert not cores_of(moved=True) & workers_cores


def test_on_a_cpu_the_engine_workers_have_their_cores_to_themselves(served):
    """vLLM binds each worker to cores and leaves the rest to everything else; Serve's proxy,
    controller and replicas, and the engines' schedulers, stay off the workers' cores; the reward
    model, which computes in its replica, keeps every core."""
    workers, others = cores_of("VLLM::Worker"), cores_of(moved=True)
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: vLLM leaves none over")
    assert workers and others and not workers & others, (workers, others)
    assert workers | others <= os.sched_getaffinity(0)
    assert cores_of("ray::ServeReplica:rlhf-ray:reward") == os.sched_getaffinity(0)


def cores_of(*titles: str, moved: bool = False) -> set[int]:
    """The cores any thread of this machine's processes with these titles (or, `moved`, those
    serve.cpus keeps off the workers' cores) may run on."""
    import psutil

    processes = [(p.pid, p.info["name"] or "") for p in psutil.process_iter(["name"])]
    chosen = set(to_move(processes)) if moved else {pid for pid, t in processes if t.startswith(titles)}
    cores: set[int] = set()
    for pid in chosen:
        try:
            for thread in os.listdir(f"/proc/{pid}/task"):
                cores |= os.sched_getaffinity(int(thread))
        except OSError:  # gone meanwhile
            pass
    return cores



def greedy_reply(folder: Path, messages: list[dict], max_tokens: int) -> str:
    """The model's greedy reply computed in this process with transformers."""
    tokenizer, model = load_tokenizer(folder), load_policy(folder)
    ids = tokenizer.render_prompt([Message(**m) for m in messages])
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=list(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id)
    special = set(tokenizer.special_ids.values())  # the server skips them too
    return tokenizer.decode([t for t in out[0, len(ids):].tolist() if t not in special])
