"""`elm-mlx serve`, started for real on a free port and driven with the official
`openai` client and raw HTTP: replies equal local generation, streaming equals
non-streaming, concurrent clients (decoded together in one batch) each get exactly
their single-request answer, logprobs equal the model's log-softmax, bad and
unsupported requests get OpenAI-style 4xx errors and leave the server healthy, a
client that hangs up stops its generation. Every test stands alone: what it checks
in /health it reads before and after."""

import json
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from checkpoints import make_hf_checkpoint
from engine import REUSE_LOGPROB_TOL, TINY_32K
from openai import OpenAI
from serving import connect, health, request, running_server, wait_idle

from elm_mlx import load, stream_generate
from elm_mlx.chat_template import OPENELM_TEMPLATE, ChatTemplate, chat_ids

APPLE = ChatTemplate(OPENELM_TEMPLATE, "OpenELM-Instruct")
MODEL = "tiny-Instruct"
PENALTY = 1.2  # the server's default repetition_penalty


@pytest.fixture(scope="module")
def folder(tmp_path_factory, llama_tokenizer):
    path = tmp_path_factory.mktemp("models") / MODEL
    make_hf_checkpoint(path, TINY_32K, seed=5)
    shutil.copyfile(llama_tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with running_server(folder, log, "--dtype", "fp32", "--max-tokens", "16") as url:
        yield {"url": url, "log": log}


@pytest.fixture(scope="module")
def url(server):
    return server["url"]


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(folder):
    return load(folder, dtype="fp32")


def expected(local, ids, max_tokens, chat=False, **sampling):
    """(text, tokens generated, finish reason) of local generation; a chat reply's text has no
    leading SentencePiece space (it is decoded on its own, as the reply is)."""
    model, tok = local
    sampling.setdefault("repetition_penalty", PENALTY)
    responses = list(stream_generate(model, tok, ids, max_tokens, **sampling))
    text = "".join(r.text for r in responses)
    if chat:
        tokens = [r.token for r in responses if r.token != tok.eos_id]
        text = tok.decode(tokens)
    return text, len(responses), responses[-1].finish_reason


def messages(text):
    return [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": text}]


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    wait_idle(url)
    status, h = request(url, "GET", "/health")
    assert status == 200 and (h["status"], h["model"], h["busy"], h["queued"], h["active"]) == ("ok", MODEL, False, 0, 0)
    assert h["max_batch"] == 8 and {"requests", "finished", "cancelled", "generated_tokens", "tasks"} <= set(h)


def test_a_model_is_retrieved_by_id_and_an_unknown_id_is_an_openai_404(client, url):
    m = client.models.retrieve(MODEL)
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "elm-mlx")
    status, reply = request(url, "GET", "/v1/models/no-such-model")
    assert status == 404 and reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    assert "no-such-model" in reply["error"]["message"] and MODEL in reply["error"]["message"]


def test_max_tokens_clamped_by_the_context_finishes_with_length(client):
    ids = [1] + [500 + i % 300 for i in range(2040)]  # 2041 tokens: 7 left of the 2048-token context
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=100, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 2041 and 0 < r.usage.completion_tokens <= 7


def test_chat_completion_is_local_generation_with_the_template(client, local):
    r = client.chat.completions.create(model=MODEL, messages=messages("Hello there"), temperature=0, max_tokens=10)
    ids = chat_ids(local[1], APPLE, messages("Hello there"))
    text, n, finish = expected(local, ids, 10, chat=True, temp=0)
    assert text and not text.startswith(" ")  # no stray SentencePiece space
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_prompt_lookup_per_request_gives_the_same_answer_and_its_stats(url, local):
    body = {"prompt": "The cat sat on the mat. The cat sat on the", "max_tokens": 12, "temperature": 0}
    _, plain = request(url, "POST", "/v1/completions", body)
    _, spec = request(url, "POST", "/v1/completions", body | {"prompt_lookup": 4})
    assert plain["choices"][0]["text"] == spec["choices"][0]["text"]
    assert "acceptance_rate" not in plain["usage"]
    assert 0 <= spec["usage"]["acceptance_rate"] <= 1 and spec["usage"]["tokens_per_forward"] >= 1


def test_streamed_chat_equals_the_whole_answer(client):
    kw = dict(model=MODEL, messages=messages("Tell me about MLX"), temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 5  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_conversation_resent_with_the_reply_reuses_the_cache(client, local, url):
    first = client.chat.completions.create(model=MODEL, messages=messages("Hi"), temperature=0, max_tokens=6)
    follow = messages("Hi") + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "More"}]
    wait_idle(url)
    before = health(url)["reused_tokens"]
    second = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=6)
    assert second.choices[0].message.content == expected(local, chat_ids(local[1], APPLE, follow), 6, True, temp=0)[0]
    assert health(url)["reused_tokens"] - before >= len(chat_ids(local[1], APPLE, messages("Hi")))


def test_completions_with_stop_strings(client, local):
    prompt = "Once upon a time"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    text, n, _ = expected(local, local[1].encode(prompt), 12, temp=0)
    assert full.object == "text_completion" and full.choices[0].text == text
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(local[1].encode(prompt)), n)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="A", temperature=1.0, top_p=1.0, seed=seed,
                                         max_tokens=12).choices[0].text

    assert sample(7) == sample(7) != sample(8)


def test_twenty_concurrent_requests_are_all_answered(client, local, url):
    def ask(i):
        kw = dict(model=MODEL, messages=messages(f"Question number {i}"), temperature=0, max_tokens=8)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
        return client.chat.completions.create(**kw).choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, range(20)))
    # Each client gets its own answer: no tokens crossed between requests served one after another.
    for i, answer in enumerate(answers):
        ids = chat_ids(local[1], APPLE, messages(f"Question number {i}"))
        assert answer == expected(local, ids, 8, True, temp=0)[0]
    wait_idle(url)


def test_eight_concurrent_requests_each_equal_their_single_request_output(client, local, url):
    """Batched together (max_batch 8): greedy token for token, and seeded sampling the same draws."""
    prompts = [f"Story {i}: once" + " upon" * i for i in range(8)]

    def ask(i):
        kw = dict(temperature=0) if i % 2 else dict(temperature=1.0, top_p=0.95, seed=100 + i)
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, **kw)
        return r.choices[0].text, kw

    wait_idle(url)
    before = health(url)["steps"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for i, (text, kw) in enumerate(answers):
        sampling = {"temp": kw["temperature"], "top_p": kw.get("top_p", 0.9), "seed": kw.get("seed")}
        assert text == expected(local, local[1].encode(prompts[i]), 12, **sampling)[0]
    assert health(url)["steps"] - before < 8 * 12  # they did share steps


def test_requests_arriving_mid_generation_join_without_corrupting_others(client, local, url):
    long = dict(model=MODEL, messages=messages("Tell me a long story"), temperature=0, max_tokens=40)
    stream = client.chat.completions.create(**long, stream=True)
    parts = []
    for chunk in stream:  # the long one is generating when the others arrive
        parts.append(chunk.choices[0].delta.content or "")
        if len(parts) == 6:
            break
    with ThreadPoolExecutor(4) as pool:
        others = list(pool.map(lambda i: client.chat.completions.create(
            model=MODEL, messages=messages(f"Short {i}"), temperature=0, max_tokens=6).choices[0].message.content,
            range(4)))
    parts += [c.choices[0].delta.content or "" for c in stream if c.choices]
    ids = chat_ids(local[1], APPLE, messages("Tell me a long story"))
    assert "".join(parts) == expected(local, ids, 40, True, temp=0)[0]
    for i, text in enumerate(others):
        assert text == expected(local, chat_ids(local[1], APPLE, messages(f"Short {i}")), 6, True, temp=0)[0]


def direct_log_softmax(local, ids):
    import mlx.core as mx
    import numpy as np

    logits = np.array(local[0](mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def test_chat_logprobs_equal_the_models_log_softmax(client, local):
    kw = dict(model=MODEL, messages=messages("Logprobs please"), temperature=0, max_tokens=8, logprobs=True,
              top_logprobs=3, extra_body={"repetition_penalty": 1.0})
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    ids = chat_ids(local[1], APPLE, messages("Logprobs please"))
    generated = []
    for e in entries:  # greedy: each token is the direct forward's best one
        ref = direct_log_softmax(local, ids + generated)[-1]
        best = int(ref.argmax())
        assert abs(e.logprob - ref[best]) <= 1e-4
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(sorted(ref)[::-1][:3], abs=1e-4)
        assert bytes(e.bytes) == local[1].token_bytes(best) or best == local[1].eos_id
        generated.append(best)
    assert len(entries) == r.usage.completion_tokens
    streamed = client.chat.completions.create(**kw, stream=True)
    lp = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # The streamed request may read part of its prompt from the first one's kept row: the same
    # tokens, log-probabilities within the batch engine's stated reuse tolerance (README, Serve).
    assert [e.token for e in lp] == [e.token for e in entries]
    assert [e.logprob for e in lp] == pytest.approx([e.logprob for e in entries], abs=REUSE_LOGPROB_TOL)


def test_completion_logprobs_have_the_legacy_shape(client):
    r = client.completions.create(model=MODEL, prompt="Numbers:", temperature=0, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the chosen one is the best
    assert lp.text_offset[0] == len("Numbers:") and "".join(lp.tokens) == r.choices[0].text
    assert client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=2).choices[0].logprobs is None


def test_frequency_and_presence_penalties_change_the_reply_as_locally(client, local):
    kw = dict(temperature=0, frequency_penalty=1.5, presence_penalty=0.5)
    r = client.completions.create(model=MODEL, prompt="Repeat repeat repeat", max_tokens=12, **kw)
    ids = local[1].encode("Repeat repeat repeat")
    assert r.choices[0].text == expected(local, ids, 12, temp=0, frequency_penalty=1.5, presence_penalty=0.5)[0]
    assert r.choices[0].text != expected(local, ids, 12, temp=0)[0]


GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
BAD = [  # path, body, status, param, code
    (CHAT, b"{not json", 400, None, "invalid_json"),
    (CHAT, b"[1, 2]", 400, None, "invalid_json"),
    (CHAT, b"\xff\xfe", 400, None, "invalid_json"),
    (CHAT, {}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"messages": "Hi"}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": ["Hi"]}, 400, "messages[0]", "invalid_type"),
    (CHAT, {"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages[0].role", "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content",
     "invalid_value"),
    (CHAT, GOOD | {"model": "gpt-4o"}, 404, "model", "model_not_found"),
    (CHAT, GOOD | {"model": 3}, 400, "model", "invalid_type"),
    (CHAT, GOOD | {"max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    (CHAT, GOOD | {"max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (CHAT, GOOD | {"max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    (CHAT, GOOD | {"temperature": "hot"}, 400, "temperature", "invalid_type"),
    (CHAT, GOOD | {"temperature": 3}, 400, "temperature", "invalid_value"),
    (CHAT, GOOD | {"top_p": 0}, 400, "top_p", "invalid_value"),
    (CHAT, GOOD | {"repetition_penalty": -1}, 400, "repetition_penalty", "invalid_value"),
    (CHAT, GOOD | {"seed": -1}, 400, "seed", "invalid_value"),
    (CHAT, GOOD | {"seed": True}, 400, "seed", "invalid_type"),
    (CHAT, GOOD | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    (CHAT, GOOD | {"stop": 7}, 400, "stop", "invalid_value"),
    (CHAT, GOOD | {"stream": "yes"}, 400, "stream", "invalid_type"),
    (CHAT, GOOD | {"stream_options": []}, 400, "stream_options", "invalid_type"),
    (CHAT, GOOD | {"n": 2}, 400, "n", "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 2100}]}, 400, "messages", "context_length_exceeded"),
    (TEXT, {"max_tokens": 2}, 400, "prompt", "missing_required_parameter"),
    (TEXT, {"prompt": {"text": "Hi"}}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": [1, 32000]}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": "Hi", "echo": True}, 400, "echo", "invalid_value"),
    (TEXT, {"prompt": "word " * 2100, "stream": True}, 400, "prompt", "context_length_exceeded"),
    # what this server does not do is refused by name, never silently ignored
    (CHAT, GOOD | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    (CHAT, GOOD | {"tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
    (CHAT, GOOD | {"response_format": {"type": "yaml"}}, 400, "response_format", "invalid_value"),
    (CHAT, GOOD | {"logit_bias": {"50": 10}}, 400, "logit_bias", "unsupported_parameter"),
    (CHAT, GOOD | {"temprature": 0.5}, 400, "temprature", "unknown_parameter"),
    (CHAT, GOOD | {"logprobs": True, "top_logprobs": 11}, 400, "top_logprobs", "invalid_value"),
    (CHAT, GOOD | {"top_logprobs": 2}, 400, "top_logprobs", "invalid_value"),
    (CHAT, GOOD | {"logprobs": 3}, 400, "logprobs", "invalid_type"),
    (CHAT, GOOD | {"frequency_penalty": 2.5}, 400, "frequency_penalty", "invalid_value"),
    (CHAT, GOOD | {"presence_penalty": "high"}, 400, "presence_penalty", "invalid_type"),
    (TEXT, {"prompt": "Hi", "logprobs": 11}, 400, "logprobs", "invalid_value"),
    (TEXT, {"prompt": "Hi", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    (TEXT, {"prompt": "Hi", "best_of": 3}, 400, "best_of", "invalid_value"),
    # hostile bodies are 400s, not 500s
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None, "invalid_json"),
    (TEXT, b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    (TEXT, b'{"prompt": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, 400, None, "invalid_json"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}-{b[3]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors_and_the_server_stays_up(url, path, body, status, param, code):
    got, reply = request(url, "POST", path, body)
    assert got == status
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert request(url, "GET", "/health")[0] == 200


def test_unknown_routes_and_methods_get_openai_errors(url):
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", CHAT, 405), ("POST", "/health", 405)]:
        got, reply = request(url, method, path)
        assert got == status and f"{method} {path}" in reply["error"]["message"]


def test_requests_that_are_not_json_are_refused(url):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        got, reply = request(url, "POST", CHAT, GOOD, headers={"Content-Type": ctype})
        assert got == 415 and "expected application/json" in reply["error"]["message"]


def test_a_body_over_the_cap_is_a_413_and_health_stays_responsive(url):
    big = json.dumps({"prompt": "x" * (2 << 20)})
    got, reply = request(url, "POST", TEXT, big)
    assert got == 413 and reply["error"]["code"] == "request_too_large"
    conn = connect(url)  # a body that lies about its size is cut at the cap too
    conn.putrequest("POST", TEXT)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(40):
            conn.send(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
    except OSError:
        pass  # the server may close the connection early
    assert conn.getresponse().status == 413
    conn.close()
    assert request(url, "GET", "/health")[0] == 200


def test_server_answers_after_the_bad_requests(client):
    r = client.chat.completions.create(model=MODEL, messages=messages("Still there?"), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_a_client_that_hangs_up_stops_its_generation(url, client):
    wait_idle(url)
    before = health(url)
    conn = connect(url)
    conn.request("POST", CHAT, body=json.dumps({"messages": [{"role": "user", "content": "Talk forever"}],
                                                "max_tokens": 1900, "temperature": 0, "stream": True}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    got = [resp.readline() for _ in range(8)]  # 4 events: the role, then 3 pieces of text
    assert all(line.startswith(b"data: {") for line in got[::2])
    conn.sock.close()  # hang up mid-reply
    conn.close()
    wait_idle(url)
    after = health(url)
    assert after["cancelled"] - before["cancelled"] == 1
    assert 3 <= after["generated_tokens"] - before["generated_tokens"] < 1900
    assert client.completions.create(model=MODEL, prompt="Next", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_hangs_up_before_its_answer_stops_it_too(url):
    wait_idle(url)
    before = health(url)
    conn = connect(url)
    conn.request("POST", TEXT, body=json.dumps({"prompt": "Go", "max_tokens": 1900, "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    wait_busy(url)
    conn.sock.close()
    conn.close()
    wait_idle(url)
    after = health(url)
    assert after["cancelled"] - before["cancelled"] == 1 and after["generated_tokens"] - before["generated_tokens"] < 1900
    assert after["tasks"] <= before["tasks"]  # its handler ended too


def wait_busy(url):
    for _ in range(600):
        if request(url, "GET", "/health")[1]["busy"]:
            return
    raise AssertionError("the request never started")


def test_the_chat_page_is_self_contained(url):
    status, page = request(url, "GET", "/")
    assert status == 200 and "<title>elm-mlx chat</title>" in page and "/v1/chat/completions" in page
    # No external assets: nothing loaded from another origin.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page)


def test_ctrl_c_ends_open_streams_and_the_server_cleanly(folder, tmp_path):
    process = []
    with running_server(folder, tmp_path / "serve.log", "--dtype", "fp32", process=process) as url:
        conn = connect(url)
        conn.request("POST", TEXT, body=json.dumps({"prompt": "Go", "max_tokens": 1900, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")  # generating
        process[0].send_signal(signal.SIGINT)
        events = resp.read().decode().split("\n\n")
        assert process[0].wait(timeout=60) == 0
    assert "the server is shutting down" in events[-3] and events[-2] == "data: [DONE]"
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
