"""The OpenAI request surface, checked with the official `openai` client against the served tiny
models: logprobs in both of OpenAI's shapes (and equal to the model's own log-softmax), echo of
a prompt's log-likelihood, penalties and logit bias, JSON mode, several and token-id prompts,
best_of, vLLM's extensions, /tokenize, /detokenize, /tokenizer_info and /metrics; and each
stage answering the same at its own URL (/<stage>/v1) as through the router (/v1)."""

import json
import math

import httpx
import openai
import pytest
import torch

from rlhf_ray.modeling import load_policy
from tests.served import AUTH, KEY, QUESTION
from tests.tiny import FACTS

pytestmark = pytest.mark.integration

FRANCE = "The capital of France is"


def tokenize(url: str, **body) -> list[int]:
    response = httpx.post(f"{url}/tokenize", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_chat_logprobs_name_each_token_of_the_reply_with_its_likeliest_alternatives(client):
    reply = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0,
                                           max_completion_tokens=8, logprobs=True, top_logprobs=2)
    choice = reply.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content == "Paris."
    for t in tokens:
        assert bytes(t.bytes).decode() == t.token and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        # greedy: the chosen token is the likeliest, with the same logprob
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)

    chunks = list(client.chat.completions.create(
        model="sft", messages=QUESTION, temperature=0, max_completion_tokens=8, logprobs=True,
        top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]


def test_echo_with_max_tokens_0_gives_the_prompts_log_likelihood_as_the_model_computes_it(
        url, client, tiny_policy_dir):
    prompt = "The capital of Peru is Lima."
    scored = client.completions.create(model="base", prompt=prompt, echo=True, max_tokens=0,
                                       logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    ids = tokenize(url, model="base", prompt=prompt)
    assert scored.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    assert lp.tokens[0] == "" and "".join(lp.tokens) == prompt  # the document token adds no text
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]

    # The brute-force reference: the same model's log-softmax, in this process.
    model = load_policy(tiny_policy_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    expected = [logits[k - 1, ids[k]].item() for k in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)


def test_a_replys_logprobs_sum_to_what_echo_scores_for_the_same_tokens(url, client):
    prompt = FACTS[: FACTS.index(" Lima")]
    reply = client.completions.create(model="base", prompt=prompt, temperature=0, max_tokens=6,
                                      logprobs=2)
    choice = reply.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0
    ids = tokenize(url, model="base", prompt=prompt + choice.text)
    scored = client.completions.create(model="base", prompt=ids, echo=True, max_tokens=0,
                                       logprobs=0).choices[0].logprobs
    reply_tokens = len(choice.logprobs.tokens)
    assert scored.tokens[-reply_tokens:] == choice.logprobs.tokens
    assert sum(scored.token_logprobs[-reply_tokens:]) == pytest.approx(
        sum(choice.logprobs.token_logprobs), abs=1e-3)


def test_penalties_and_logit_bias_change_the_reply(url, client):
    # Long enough to run past the memorised text, where the tiny model repeats itself.
    kwargs = dict(model="base", prompt="The capital of", temperature=0, max_tokens=150)
    plain = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(frequency_penalty=2, **kwargs).choices[0].text != plain
    assert client.completions.create(extra_body={"repetition_penalty": 5}, **kwargs).choices[0].text != plain
    assert client.completions.create(presence_penalty=2, **kwargs).choices  # too weak to move it
    first = tokenize(url, model="base", prompt=plain, add_special_tokens=False)[0]
    banned = client.completions.create(logit_bias={str(first): -100}, **kwargs).choices[0].text
    assert not banned.startswith(plain[:3])
    forced = client.completions.create(model="base", prompt="The capital of", max_tokens=3,
                                       logit_bias={str(first): 100}, logprobs=0).choices[0]
    assert len(set(forced.logprobs.tokens)) == 1


def test_json_mode_returns_json_and_a_schema_returns_json_that_fits_it(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
              "required": ["city"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="sft", messages=QUESTION, max_completion_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    parsed = json.loads(reply.choices[0].message.content)
    assert list(parsed) == ["city"] and len(parsed["city"]) <= 8
    assert reply.choices[0].finish_reason == "stop"

    reply = client.chat.completions.create(model="sft", messages=QUESTION, max_completion_tokens=60,
                                           temperature=0, response_format={"type": "json_object"})
    choice = reply.choices[0]
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":  # a tiny model may not close it within the limit
        assert isinstance(json.loads(choice.message.content), dict)


def test_a_schema_the_engine_cannot_compile_is_a_400_naming_response_format(url):
    response = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "sft", "messages": QUESTION, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"


def test_several_prompts_and_token_id_prompts_are_completed_each_n_times(url, client):
    prompts = [FRANCE, FACTS[: FACTS.index(" Lima")]]  # the second ends "... of Peru is"
    reply = client.completions.create(model="base", prompt=prompts, n=2, temperature=0, max_tokens=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text.split()[0] for c in reply.choices] == ["Paris", "Paris", "Lima", "Lima"]
    by_ids = client.completions.create(model="base", prompt=[tokenize(url, model="base", prompt=p)
                                                             for p in prompts],
                                       temperature=0, max_tokens=2)
    assert [c.text for c in by_ids.choices] == [reply.choices[0].text, reply.choices[2].text]
    assert by_ids.usage.prompt_tokens == sum(len(tokenize(url, model="base", prompt=p)) for p in prompts)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model="base", prompt=prompts, temperature=0,
                                           max_tokens=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: reply.choices[0].text, 1: reply.choices[2].text}


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(client):
    kwargs = dict(model="base", prompt="The", max_tokens=6, temperature=1.0, seed=11, logprobs=0)
    samples = client.completions.create(n=4, **kwargs).choices
    best = client.completions.create(n=2, best_of=4, **kwargs).choices
    by_mean = sorted(samples, key=lambda c: -sum(c.logprobs.token_logprobs) / len(c.logprobs.tokens))
    assert [c.text for c in best] == [c.text for c in by_mean[:2]]


def test_the_chat_fields_of_current_clients_and_vllms_extensions_take_effect(client):
    base = dict(model="sft", messages=QUESTION, temperature=0)
    assert client.chat.completions.create(max_completion_tokens=2, **base).usage.completion_tokens == 2
    long = client.chat.completions.create(max_tokens=9, extra_body={"ignore_eos": True}, **base)
    assert long.usage.completion_tokens == 9 and long.choices[0].finish_reason == "length"
    parts = client.chat.completions.create(
        model="sft", temperature=0, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}])
    assert parts.choices[0].message.content == "Paris."
    greedy = client.chat.completions.create(extra_body={"top_k": 1}, temperature=1.0, seed=1,
                                            model="sft", messages=QUESTION, max_tokens=8)
    assert greedy.choices[0].message.content == "Paris."
    kept = client.chat.completions.create(stop=["is"], extra_body={"include_stop_str_in_output": True},
                                          **base, max_tokens=8)
    assert kept.choices[0].message.content == "Paris" or kept.choices[0].message.content.endswith("is")
    assert client.chat.completions.create(
        **base, max_tokens=4, user="u1", metadata={"team": "a"}, store=False, seed=3,
        frequency_penalty=0, presence_penalty=0, tool_choice="none").choices


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.0"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
])
def test_what_the_models_cannot_do_is_a_400_naming_the_field(url, body, param):
    response = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "sft", "messages": QUESTION, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_tokenize_gives_the_ids_the_chat_route_feeds_the_model_and_detokenize_reverses_it(url, client):
    ids = tokenize(url, model="sft", messages=QUESTION)
    usage = client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=1).usage
    assert len(ids) == usage.prompt_tokens
    listed = httpx.post(f"{url}/tokenize", headers=AUTH, timeout=60, json={
        "model": "base", "prompt": FRANCE, "return_token_strs": True}).json()
    assert listed["count"] == len(listed["tokens"]) and listed["max_model_len"] == 512
    assert "".join(listed["token_strs"]) == "<|endoftext|>" + FRANCE
    back = httpx.post(f"{url}/detokenize", headers=AUTH, timeout=60,
                      json={"model": "base", "tokens": listed["tokens"][1:]}).json()
    assert back == {"prompt": FRANCE}
    outside = httpx.post(f"{url}/detokenize", headers=AUTH, timeout=60,
                         json={"model": "base", "tokens": [10**6]})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"


def test_tokenizer_info_and_tokenize_without_a_model_answer_for_the_runs_tokenizer(url):
    """As vLLM's server (one model) has them, so clients written for it (lm-eval's remote
    tokenizer) work: the run's stages share one tokenizer."""
    info = httpx.get(f"{url}/tokenizer_info", headers=AUTH, timeout=60).json()
    assert info["bos_token"] == "<|endoftext|>" and info["model_max_length"] == 512
    assert "{{ bos_token }}" in info["chat_template"] and info["eos_token"]
    assert httpx.get(f"{url}/tokenizer_info?model=sft", headers=AUTH, timeout=60).json() == info
    assert tokenize(url, prompt=FRANCE) == tokenize(url, model="base", prompt=FRANCE)
    unknown = httpx.get(f"{url}/tokenizer_info?model=gpt-5", headers=AUTH, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert httpx.get(f"{url}/tokenizer_info", timeout=60).status_code == 401


def sample(text: str, name: str, **labels: str) -> float:
    """A sample's value from Prometheus's text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_each_stage_answers_at_its_own_url_as_through_the_router(url, client):
    own = openai.OpenAI(base_url=f"{url}/sft/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in own.models.list().data] == ["sft"]
    asked = {"model": "sft", "messages": QUESTION, "max_tokens": 6, "temperature": 0,
             "logprobs": True, "top_logprobs": 2}
    direct, routed = own.chat.completions.create(**asked), client.chat.completions.create(**asked)
    assert direct.choices[0].message.content == routed.choices[0].message.content == "Paris."
    assert [t.logprob for t in direct.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in routed.choices[0].logprobs.content], abs=1e-4)
    streamed = own.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris."
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
    echoed = {"model": "sft", "prompt": FRANCE, "max_tokens": 0, "echo": True, "logprobs": 1}
    direct_echo = own.completions.create(**echoed).choices[0].logprobs.token_logprobs
    routed_echo = client.completions.create(**echoed).choices[0].logprobs.token_logprobs
    assert direct_echo[0] is None and routed_echo[0] is None  # the first token has no context
    assert direct_echo[1:] == pytest.approx(routed_echo[1:], abs=1e-4)
    assert tokenize(f"{url}/sft", messages=QUESTION) == tokenize(url, model="sft", messages=QUESTION)
    with pytest.raises(openai.NotFoundError, match="this route serves \\['sft'\\]"):
        own.chat.completions.create(**{**asked, "model": "rlhf"})
    assert httpx.get(f"{url}/sft/v1/models", timeout=30).status_code == 401  # behind the key too


@pytest.mark.parametrize("prefix", ["", "/sft"], ids=["router", "stage"])
def test_metrics_count_requests_by_code_and_time_each_models_replies(url, prefix):
    """The router counts what it answers at /metrics, each stage what it answers at its own URL
    at /<stage>/metrics."""
    client = openai.OpenAI(base_url=f"{url}{prefix}/v1", api_key=KEY, max_retries=0)

    def metrics() -> str:
        response = httpx.get(f"{url}{prefix}/metrics", headers=AUTH, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return response.text

    before = metrics()
    client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=4)
    list(client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=4, stream=True))
    httpx.post(f"{url}{prefix}/v1/chat/completions", headers=AUTH, timeout=30, json={"model": "sft"})
    after = metrics()

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("rlhf_ray_http_requests_total", route="/v1/chat/completions", code="200") == 2
    assert grew("rlhf_ray_http_requests_total", route="/v1/chat/completions", code="400") == 1
    assert grew("rlhf_ray_time_to_first_token_seconds_count", model="sft") == 2
    assert grew("rlhf_ray_generation_tokens_total", model="sft") >= 2
    assert sample(after, "rlhf_ray_requests_in_flight", model="sft") == 0
    assert math.isfinite(sample(after, "rlhf_ray_request_duration_seconds_sum", model="sft"))
    assert httpx.get(f"{url}{prefix}/metrics", timeout=30).status_code == 401  # behind the key too
