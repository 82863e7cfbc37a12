"""serve/replies.py: a request's deltas rendered as OpenAI's choices, logprobs and usage."""

from serve.replies import Choices, Delta, TokenLogprob, completion_logprobs, merge


def tok(text: str, logprob: float | None, *top: tuple[str, float]) -> TokenLogprob:
    return TokenLogprob(text, list(text.encode()), logprob, [(s, list(s.encode()), lp) for s, lp in top])


def test_completion_logprobs_offsets_index_the_text_and_the_first_prompt_token_has_none():
    tokens = [tok("", None), tok("The", -0.1, ("The", -0.1)), tok(" cap", -float("inf"))]
    shaped = completion_logprobs(tokens, offset=0)
    assert shaped["tokens"] == ["", "The", " cap"]
    assert shaped["token_logprobs"] == [None, -0.1, -9999.0]  # JSON has no -inf
    assert shaped["top_logprobs"] == [None, {"The": -0.1}, {}]
    assert shaped["text_offset"] == [0, 0, 3]


def test_an_echoed_prompt_comes_before_the_reply_in_text_and_logprobs():
    choices = Choices(n=1, chat=False, logprobs=True)
    choices.add(Delta(0, " Par", None, 3, 1, [tok(" Par", -0.5)], echo="The is",
                      echo_logprobs=[tok("", None), tok("The", -1.0), tok(" is", -2.0)]))
    choices.add(Delta(0, "is", "length", 3, 2, [tok("is", -0.25)]))
    [whole] = choices.whole()
    assert whole["text"] == "The is Paris" and whole["finish_reason"] == "length"
    assert whole["logprobs"]["text_offset"] == [0, 0, 3, 6, 10]
    assert choices.usage() == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_usage_sums_each_prompt_once_however_many_choices_it_has():
    choices = Choices(n=2, chat=False, logprobs=False)
    for index, prompt_tokens in ((0, 4), (1, 4), (2, 7), (3, 7)):
        choices.add(Delta(index, "x", "stop", prompt_tokens, 1))
    assert choices.usage() == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}


def test_chat_choices_carry_logprobs_in_chats_shape_streamed_and_whole():
    choices = Choices(n=1, chat=True, logprobs=True)
    chunk = choices.add(Delta(0, "Hi", "stop", 2, 1, [tok("Hi", -0.5, ("Hi", -0.5), ("Ho", -2.0))]))
    assert chunk["delta"] == {"content": "Hi"}
    entry = chunk["logprobs"]["content"][0]
    assert entry == {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        {"token": "Ho", "logprob": -2.0, "bytes": [72, 111]}]}
    assert choices.whole()[0]["message"] == {"role": "assistant", "content": "Hi"}


def test_merging_a_batch_joins_each_choices_text_and_logprobs():
    merged = merge([Delta(0, "a", None, 1, 1, [tok("a", -1.0)]), Delta(0, "b", "stop", 1, 2, [tok("b", -2.0)])])
    assert [(d.text, [t.token for t in d.logprobs], d.finish_reason) for d in merged] == [("ab", ["a", "b"], "stop")]
