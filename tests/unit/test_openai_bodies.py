"""The OpenAI request bodies (serve/protocol.py): what they take, what they refuse, and why."""

import pytest
from pydantic import ValidationError

from serve.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest, validation_message

CHAT = {"model": "sft", "messages": [{"role": "user", "content": "Hi"}]}


def refused(kind, body) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as e:
        kind.model_validate(body)
    return validation_message(e.value)


def test_the_fields_current_openai_clients_send_are_taken():
    request = ChatCompletionRequest.model_validate({
        **CHAT, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2,
        "frequency_penalty": 0, "presence_penalty": 0.5, "logit_bias": {"42": -100},
        "response_format": {"type": "text"}, "user": "u1", "metadata": {"team": "a"},
        "store": False, "seed": 3, "stop": "\n", "n": 2, "stream": True,
        "stream_options": {"include_usage": True}, "service_tier": "auto",
        "tool_choice": "none", "tools": [], "parallel_tool_calls": False, "modalities": ["text"]})
    assert request.reply_limit == 7 and request.top_logprobs_asked == 2
    assert request.stop == ["\n"] and request.logit_bias == {"42": -100}


def test_vllms_sampling_extensions_are_taken():
    request = CompletionRequest.model_validate({
        "model": "base", "prompt": "The", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
        "min_tokens": 2, "ignore_eos": True, "skip_special_tokens": False,
        "include_stop_str_in_output": True, "stop_token_ids": [3]})
    assert (request.top_k, request.min_tokens, request.stop_token_ids) == (5, 2, [3])


def test_a_null_is_the_fields_default():
    request = ChatCompletionRequest.model_validate({**CHAT, "temperature": None, "stop": None,
                                                    "logprobs": None, "n": None})
    assert (request.temperature, request.stop, request.logprobs, request.n) == (1.0, [], False, 1)


def test_text_parts_and_the_developer_role_read_as_text_and_a_system_prompt():
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of"},
                                     {"type": "text", "text": "Peru?"}]}]})
    assert [(m.prompt_role, m.content) for m in request.messages] == [
        ("system", "Be brief."), ("user", "Capital of\nPeru?")]


def test_an_assistant_message_echoed_back_from_an_openai_reply_is_taken():
    message = {"role": "assistant", "content": "Lima.", "refusal": None, "tool_calls": None,
               "function_call": None, "audio": None, "annotations": []}
    request = ChatCompletionRequest.model_validate({**CHAT, "messages": CHAT["messages"] + [
        message, {"role": "user", "content": "And Kenya?"}]})
    assert request.messages[1].content == "Lima."


@pytest.mark.parametrize("change, param, why", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "no tool template"),
    ({"tool_choice": "required"}, "tool_choice", "no tool template"),
    ({"functions": [{"name": "f"}]}, "functions", "no tool template"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "text only"),
    ({"modalities": ["text", "audio"]}, "modalities", "text only"),
    ({"reasoning_effort": "high"}, "reasoning_effort", "not reasoning models"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.0", "'image_url'; the models served here read and write text only"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
     "messages.0.role", "no tool template"),
    ({"store": True}, "store", "keeps no completions"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "send one of them"),
    ({"logit_bias": {"Paris": 5}}, "logit_bias", "not a token id"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
])
def test_what_a_text_model_cannot_do_is_refused_naming_the_field_and_why(change, param, why):
    message, named = refused(ChatCompletionRequest, {**CHAT, **change})
    assert named == param and why in message, message


def test_an_unknown_field_is_refused_by_name():
    message, param = refused(ChatCompletionRequest, {**CHAT, "temprature": 0.5})
    assert param == "temprature" and "not a field this server takes" in message


@pytest.mark.parametrize("prompt, prompts", [
    ("The capital", ["The capital"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_a_completion_prompt_is_a_text_texts_token_ids_or_lists_of_them(prompt, prompts):
    assert CompletionRequest.model_validate({"model": "base", "prompt": prompt}).prompts == prompts


@pytest.mark.parametrize("change, param, why", [
    ({"max_tokens": 0}, "max_tokens", "needs echo"),
    ({"prompt": []}, "prompt", "1 to 64 prompts"),
    ({"prompt": [[1], []]}, "prompt", "empty list"),
    ({"prompt": [-1]}, "prompt", None),
    ({"suffix": "end"}, "suffix", "insertion is not supported"),
    ({"best_of": 1, "n": 2}, "best_of", "less than n"),
    ({"best_of": 3, "stream": True}, "best_of", "cannot stream"),
    ({"logprobs": 21}, "logprobs", None),
])
def test_completion_requests_that_cannot_be_served(change, param, why):
    message, named = refused(CompletionRequest, {"model": "base", "prompt": "The", **change})
    assert named is not None and named.startswith(param) and (why is None or why in message), message


def test_echo_with_max_tokens_0_asks_for_the_prompt_alone():
    request = CompletionRequest.model_validate({"model": "base", "prompt": "The", "echo": True,
                                                "max_tokens": 0, "logprobs": 1})
    assert request.reply_limit == 0 and request.top_logprobs_asked == 1


def test_tokenize_takes_a_prompt_or_messages_but_not_both():
    assert TokenizeRequest.model_validate({"model": "sft", "prompt": "hi"}).add_special_tokens
    message, _ = refused(TokenizeRequest, {"model": "sft", "prompt": "hi", **CHAT})
    assert "one of them" in message
