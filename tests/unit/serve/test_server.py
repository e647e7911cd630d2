"""``tracerl serve`` (tracerl/serve): a real uvicorn server on 127.0.0.1, the real ``openai``
client and httpx.  Served outputs equal ``LLM`` (hence ``generate``) under the same seeds, alone
and concurrent; streamed chunks concatenate to the non-streamed response, with the trace; every
error is OpenAI's error object naming the field; a client that goes away frees its slots and KV
pages."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from tests.support.serving import ThreadServer
from tests.support.tiny_models import scrambled
from tracerl import LLM, SamplingParams
from tracerl.serve.config import ServeConfig

KEY = "test-key"
NAME = "tiny"
# The greedy response of the scrambled float64 tiny-block to "Hello" holds "&f" at tokens 18-19,
# token 19 starting a block: the "&" ends a block, so the stream must hold it back (test_llm.py).
PROMPT, STOP = "Hello", "&f"
BLOCK = 4


def make_config(**kw) -> ServeConfig:
    base = dict(api_key=KEY, served_model_name=NAME, max_running=4, max_waiting=4, max_body_bytes=64 * 1024,
                max_tokens_cap=256)
    return ServeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def served():
    with ThreadServer(make_config(), scrambled("tiny-block", dtype=torch.float64)) as s:
        yield s


@pytest.fixture(scope="module")
def llm():
    return LLM(scrambled("tiny-block", dtype=torch.float64))


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(served, route: str, body, *, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(served.url + route, content=content, headers={**headers, "content-type": "application/json"},
                      timeout=kw.pop("timeout", 120), **kw)


# -- outputs ------------------------------------------------------------------------------------
def test_completion_equals_llm_generate(client, llm):
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24)
    want = llm.generate(PROMPT, SamplingParams(max_tokens=24))[0].outputs[0]
    c = out.choices[0]
    assert (c.text, c.finish_reason) == (want.text, want.finish_reason)
    assert out.object == "text_completion" and out.model == NAME and out.id.startswith("cmpl-")
    prompt_tokens = len(llm.get_tokenizer().encode(PROMPT, add_special_tokens=False))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, len(want.token_ids))
    assert out.usage.total_tokens == prompt_tokens + len(want.token_ids)


def test_n_prompt_lists_and_seeds_equal_llm(client, llm):
    prompts = [PROMPT, "abc"]
    kw = dict(model=NAME, prompt=prompts, n=3, max_tokens=16, temperature=1.0, seed=11)
    out = client.completions.create(**kw)
    want = llm.generate(prompts, SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=11))
    assert [c.index for c in out.choices] == list(range(6))
    texts = [c.text for c in out.choices]
    assert texts == [o.text for r in want for o in r.outputs]
    assert len(set(texts[:3])) > 1  # the samples of one prompt differ: each has its own stream
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # seeded: reproducible
    assert [c.text for c in client.completions.create(**{**kw, "seed": 12}).choices] != texts


def test_chat_equals_llm_chat(client, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=16)
    want = llm.chat(messages, SamplingParams(max_tokens=16))[0].outputs[0]
    m = out.choices[0].message
    assert (m.role, m.content, out.choices[0].finish_reason) == ("assistant", want.text, want.finish_reason)
    assert out.object == "chat.completion" and out.usage.completion_tokens == len(want.token_ids)
    # Content parts and the developer role are the same conversation.
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    again = client.chat.completions.create(model=NAME, messages=parts, max_completion_tokens=16)
    assert again.choices[0].message.content == want.text


def test_stop_strings_end_the_response(client, llm):
    want = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop=STOP))[0].outputs[0]
    assert (want.finish_reason, want.stop_reason) == ("stop", STOP)  # the premise of the test
    c = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, stop=[STOP]).choices[0]
    assert (c.text, c.finish_reason, c.model_extra["stop_reason"]) == (want.text, "stop", STOP)
    assert STOP not in c.text
    kept = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, stop=STOP,
                                     extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == want.text + STOP


def test_logprobs_are_the_sampled_tokens(client, llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, logprobs=True)
    want = llm.generate(PROMPT, params)[0].outputs[0]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, logprobs=0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-9)
    assert len(lp.tokens) == len(want.token_ids) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPT}],
                                          max_completion_tokens=12, logprobs=True, temperature=1.0, seed=3)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(t.logprob <= 0 for t in chat.choices[0].logprobs.content)


def test_trace_extension_holds_the_step_map(client, llm):
    want = llm.generate(PROMPT, SamplingParams(max_tokens=16, steps=2))[0].outputs[0]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16,
                                    extra_body={"steps": 2, "return_trace": True})
    trace = out.choices[0].model_extra["tracerl"]
    assert trace == {"token_ids": want.token_ids, "step_map": want.step_map, "nfe": want.nfe, "block_size": BLOCK}
    assert want.nfe < len(want.token_ids)  # 2 steps per block: several tokens per forward
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16)
    assert "tracerl" not in (plain.choices[0].model_extra or {})


# -- streaming ----------------------------------------------------------------------------------
def test_stream_chunks_concatenate_to_the_response(client):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=24, stop=[STOP])
    full = client.completions.create(**kw, extra_body={"return_trace": True}).choices[0]
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    body = [ch.choices[0] for ch in chunks if ch.choices]
    assert "".join(c.text for c in body) == full.text
    traces = [c.model_extra["tracerl"] for c in body]
    want = full.model_extra["tracerl"]
    assert [t for tr in traces for t in tr["token_ids"]] == want["token_ids"]
    assert [s for tr in traces for s in tr["step_map"]] == want["step_map"]
    starts = [tr["start"] for tr in traces]
    assert starts == [sum(len(tr["token_ids"]) for tr in traces[:k]) for k in range(len(traces))]
    # A chunk per committed block: after the first (the prompt's tail shares it), whole blocks.
    assert len(body) >= 4 and all(len(tr["token_ids"]) == BLOCK for tr in traces[1:-1])
    assert traces[-1]["nfe"] == want["nfe"]
    assert [c.finish_reason for c in body] == [None] * (len(body) - 1) + ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want["token_ids"])
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stream(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=20, n=2,
              temperature=1.0, seed=5)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for index in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == full.choices[index].message.content
        assert mine[-1].finish_reason == full.choices[index].finish_reason
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_raw_sse_ends_with_done(served):
    with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 8, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


# -- concurrency --------------------------------------------------------------------------------
def test_concurrent_requests_equal_alone_and_bad_ones_disturb_nothing(served, llm):
    jobs = [dict(prompt=f"{PROMPT} {k}", max_tokens=8 + 4 * k, temperature=1.0 if k % 2 else 0.0, seed=k)
            for k in range(6)]
    bad = [{"prompt": PROMPT, "top_p": "x"}, {"prompt": [9999]}, {"prompt": PROMPT, "model": "nope"}]
    results: dict = {}

    def call(key, body):
        results[key] = post(served, "/v1/completions", body)

    threads = [threading.Thread(target=call, args=(("ok", k), b)) for k, b in enumerate(jobs)]
    threads += [threading.Thread(target=call, args=(("bad", k), b)) for k, b in enumerate(bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, body in enumerate(jobs):
        params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"], seed=body["seed"])
        assert results[("ok", k)].json()["choices"][0]["text"] == llm.generate(body["prompt"], params)[0].outputs[0].text
    assert [results[("bad", k)].status_code for k in range(3)] == [400, 400, 404]


def test_full_queue_answers_503_with_retry_after():
    # One running sample and no queue fill this server: one more is refused, not queued forever.
    config = make_config(max_running=1, max_waiting=0, max_tokens_cap=2000)
    with ThreadServer(config, scrambled("tiny-block", dtype=torch.float64)) as s:
        long = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True}  # ~2000 forwards
        with httpx.stream("POST", s.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json=long, timeout=60) as stream:
            lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)
            r = post(s, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["code"] == "overloaded"
        m = s.wait_idle()
        assert m["tracerl_kv_pages_free"] == m["tracerl_kv_pages_total"]
        assert post(s, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_client_disconnect_frees_slots_and_pages(served):
    before = served.metrics()["tracerl_requests_aborted_total"]
    # A stream closed after its first block ...
    with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 256, "n": 4, "stream": True, "ignore_eos": True}, timeout=60) as r:
        for line in r.iter_lines():
            if '"tracerl"' in line:
                break
    m = served.wait_idle()
    assert m["tracerl_requests_aborted_total"] == before + 1
    assert m["tracerl_kv_pages_free"] == m["tracerl_kv_pages_total"]
    # ... and a plain request whose client gives up.
    with pytest.raises(httpx.ReadTimeout):
        post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 256, "n": 4, "ignore_eos": True}, timeout=0.5)
    m = served.wait_idle()
    assert m["tracerl_requests_aborted_total"] == before + 2
    assert m["tracerl_kv_pages_free"] == m["tracerl_kv_pages_total"]


def test_request_timeout_is_504(served):
    served.server.config.request_timeout_s = 0.2
    try:
        r = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 256, "n": 4, "ignore_eos": True})
    finally:
        served.server.config.request_timeout_s = 600.0
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert served.wait_idle()["tracerl_kv_pages_free"] > 0


# -- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("route, body, status, param", [
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_token": 3}, 400, "max_token"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 257}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [5] * 2048}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 2000, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [260]}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "n": 9}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "block_size": 8}, 400, "block_size"),
    ("/v1/completions", {"prompt": PROMPT, "strategy": "nope"}, 400, "strategy"),
    ("/v1/completions", {"prompt": PROMPT, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 999},
     400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
])
def test_bad_requests_get_openai_errors(served, route, body, status, param):
    r = post(served, route, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    assert err["message"].split(":")[0].split("[")[0].split(".")[0] in (param, "model")


def test_transport_level_errors(served, client):
    assert post(served, "/v1/completions", b"{not json").json()["error"]["message"].startswith("body: not valid JSON")
    big = post(served, "/v1/completions", {"prompt": "x" * (70 * 1024)})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert post(served, "/v1/completions", {"prompt": PROMPT}, key=None).status_code == 401
    assert post(served, "/v1/completions", {"prompt": PROMPT}, key="wrong").status_code == 401
    assert httpx.get(served.url + "/v1/models").status_code == 401
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # open without a key
    missing = httpx.get(served.url + "/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    # The openai client maps them to its exception classes.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=PROMPT, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [NAME]


def test_metrics_count_requests_tokens_and_latency(served, client):
    before = served.metrics()
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8)
    post(served, "/v1/completions", {"prompt": PROMPT, "n": 0})
    m = served.metrics()
    ok, bad = ('tracerl_requests_total{route="/v1/completions",status="200"}',
               'tracerl_requests_total{route="/v1/completions",status="400"}')
    assert m[ok] == before.get(ok, 0) + 1 and m[bad] == before.get(bad, 0) + 1
    assert m["tracerl_generation_tokens_total"] == before["tracerl_generation_tokens_total"] + out.usage.completion_tokens
    assert m["tracerl_prompt_tokens_total"] == before["tracerl_prompt_tokens_total"] + out.usage.prompt_tokens
    assert m["tracerl_request_latency_seconds_count"] == before["tracerl_request_latency_seconds_count"] + 2
    assert m['tracerl_request_latency_seconds_bucket{le="+Inf"}'] == m["tracerl_request_latency_seconds_count"]
    assert sum(v for k, v in m.items() if k.startswith("tracerl_requests_total")) == \
        m["tracerl_request_latency_seconds_count"]


# -- full attention -----------------------------------------------------------------------------
def test_full_attention_model_is_served_exactly():
    model_llm = LLM(scrambled("tiny-full", dtype=torch.float64))
    with ThreadServer(make_config(api_key=None), scrambled("tiny-full", dtype=torch.float64)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        for extra in ({}, {"full_cache": "dual"}):
            params = SamplingParams(max_tokens=16, temperature=1.0, seed=2, **extra)
            want = model_llm.generate(PROMPT, params)[0].outputs[0]
            out = c.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=2,
                                       extra_body={**extra, "return_trace": True})
            assert out.choices[0].model_extra["tracerl"]["token_ids"] == want.token_ids
            chunks = list(c.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=2,
                                               extra_body=extra, stream=True))
            assert [t for ch in chunks for t in ch.choices[0].model_extra["tracerl"]["token_ids"]] == want.token_ids


def test_a_failing_engine_step_is_a_500_and_the_server_goes_on(served, client):
    engine = served.server.engine
    real_step = engine.loop.step

    def broken_step():  # one step fails (think: a CUDA error), the next ones are real
        engine.loop.step = real_step
        raise RuntimeError("injected failure")

    engine.loop.step = broken_step
    r = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    m = served.wait_idle()
    assert m["tracerl_kv_pages_free"] == m["tracerl_kv_pages_total"]
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8).choices[0].finish_reason
    assert httpx.get(served.url + "/health").status_code == 200
