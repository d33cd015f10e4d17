"""The official `openai` and `ollama` Python clients against a running llmgenie server.

Usage: python clients.py BASE_URL MODEL
Only the base URL differs from talking to OpenAI or Ollama. Prints one line per check and a
closing "N passed, N failed" line; exits 1 when anything failed.
"""
import sys
import traceback

import ollama
import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append(True)
            print(f"ok   {name}")
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            results.append(False)
            print(f"FAIL {name}")
            traceback.print_exc()
        return fn
    return wrap


oa = openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed")
ol = ollama.Client(host=BASE)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@check("openai chat")
def _():
    r = oa.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0


@check("openai chat streaming equals non-streaming")
def _():
    plain = oa.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12)
    stream = oa.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12,
                                        stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == plain.choices[0].message.content, (text, plain.choices[0].message.content)
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


@check("openai completions")
def _():
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5)
    assert r.choices[0].text
    assert r.usage.completion_tokens <= 5


@check("openai models.list")
def _():
    ids = [m.id for m in oa.models.list()]
    assert MODEL in ids, ids


@check("openai errors are raised as the client's exceptions")
def _():
    try:
        oa.chat.completions.create(model="no-such-model", messages=MESSAGES)
    except openai.NotFoundError as e:
        assert "not found" in str(e)
    else:
        raise AssertionError("no error for an unknown model")
    try:
        oa.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
    except openai.BadRequestError as e:
        assert "temperature" in str(e)
    else:
        raise AssertionError("no error for temperature 5")


@check("ollama generate")
def _():
    r = ol.generate(model=MODEL, prompt="Hi", options={"temperature": 0, "num_predict": 8})
    assert r.done and r.response
    assert r.eval_count <= 8 and r.prompt_eval_count > 0 and r.total_duration > 0


@check("ollama generate streaming equals non-streaming")
def _():
    plain = ol.generate(model=MODEL, prompt="Hi", options={"temperature": 0, "num_predict": 8})
    parts = list(ol.generate(model=MODEL, prompt="Hi", stream=True, options={"temperature": 0, "num_predict": 8}))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.response for p in parts) == plain.response


@check("ollama chat, streaming and not")
def _():
    plain = ol.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 8})
    assert plain.message.role == "assistant" and plain.message.content
    parts = list(ol.chat(model=MODEL, messages=MESSAGES, stream=True, options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.message.content for p in parts) == plain.message.content


@check("ollama list and ps")
def _():
    names = [m.model for m in ol.list().models]
    assert f"{MODEL}:latest" in names, names
    running = [m.model for m in ol.ps().models]
    assert f"{MODEL}:latest" in running, running


@check("ollama errors are raised as the client's exceptions")
def _():
    try:
        ol.generate(model="no-such-model", prompt="Hi")
    except ollama.ResponseError as e:
        assert e.status_code == 404
    else:
        raise AssertionError("no error for an unknown model")


passed, failed = results.count(True), results.count(False)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
