"""`elm-mlx serve`, started for real on a free port and driven with the official
`openai` client and raw HTTP: replies equal local generation, streaming equals
non-streaming, 20 concurrent clients are all answered correctly, bad requests get
OpenAI-style 4xx errors and leave the server healthy, a client that hangs up
stops its generation."""

import json
import re
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from checkpoints import make_hf_checkpoint
from engine import TINY_32K
from openai import OpenAI
from serving import connect, request, running_server, wait_idle

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


def expected(local, ids, max_tokens, **sampling):
    model, tok = local
    responses = list(stream_generate(model, tok, ids, max_tokens, repetition_penalty=PENALTY, **sampling))
    return "".join(r.text for r in responses), len(responses), responses[-1].finish_reason


def messages(text):
    return [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": text}]


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert request(url, "GET", "/health") == (200, {"status": "ok", "model": MODEL, "busy": False, "queued": 0})


def test_chat_completion_is_local_generation_with_the_template(client, local):
    r = client.chat.completions.create(model=MODEL, messages=messages("Hello there"), temperature=0, max_tokens=10)
    ids = chat_ids(local[1], APPLE, messages("Hello there"))
    text, n, finish = expected(local, ids, 10, temp=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_prompt_lookup_per_request_gives_the_same_answer_and_its_stats(url, local):
    body = {"prompt": "The cat sat on the mat. The cat sat on the", "max_tokens": 12, "temperature": 0}
    _, plain = request(url, "POST", "/v1/completions", body)
    _, spec = request(url, "POST", "/v1/completions", body | {"prompt_lookup": 4})
    text, n, _ = expected(local, local[1].encode(body["prompt"]), 12, temp=0)
    assert plain["choices"][0]["text"] == spec["choices"][0]["text"] == text
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


def test_a_conversation_resent_with_the_reply_reuses_the_cache(client, local, server):
    first = client.chat.completions.create(model=MODEL, messages=messages("Hi"), temperature=0, max_tokens=6)
    follow = messages("Hi") + [{"role": "assistant", "content": first.choices[0].message.content},
                               {"role": "user", "content": "More"}]
    second = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=6)
    assert second.choices[0].message.content == expected(local, chat_ids(local[1], APPLE, follow), 6, temp=0)[0]
    line = server["log"].read_text().splitlines()
    reused = [int(m.group(1)) for m in re.finditer(r"\((\d+) from the cache\)", "\n".join(line))][-1]
    assert reused >= len(chat_ids(local[1], APPLE, messages("Hi")))


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
        assert answer == expected(local, chat_ids(local[1], APPLE, messages(f"Question number {i}")), 8, temp=0)[0]
    wait_idle(url)


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
    (CHAT, GOOD | {"prompt_lookup": -1}, 400, "prompt_lookup", "invalid_value"),
    (CHAT, GOOD | {"num_draft_tokens": 2}, 400, "num_draft_tokens", "invalid_value"),  # no --draft-model
    (TEXT, {"max_tokens": 2}, 400, "prompt", "missing_required_parameter"),
    (TEXT, {"prompt": {"text": "Hi"}}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": [1, 32000]}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    (TEXT, {"prompt": "Hi", "echo": True}, 400, "echo", "invalid_value"),
    (TEXT, {"prompt": "word " * 2100, "stream": True}, 400, "prompt", "context_length_exceeded"),
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


def test_server_answers_after_the_bad_requests(client):
    r = client.chat.completions.create(model=MODEL, messages=messages("Still there?"), max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_a_client_that_hangs_up_stops_its_generation(url, server, client):
    conn = connect(url)
    conn.request("POST", CHAT, body=json.dumps({"messages": [{"role": "user", "content": "Talk forever"}],
                                                "max_tokens": 1900, "temperature": 0, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    got = [resp.readline() for _ in range(8)]  # 4 events: the role, then 3 pieces of text
    assert all(line.startswith(b"data: {") for line in got[::2])
    conn.sock.close()  # hang up mid-reply
    conn.close()
    wait_idle(url)
    line = [x for x in server["log"].read_text().splitlines() if "finish: client hung up" in x][-1]
    generated = int(re.search(r"(\d+) generated", line).group(1))
    assert 3 <= generated < 1900
    assert client.completions.create(model=MODEL, prompt="Next", max_tokens=2).usage.completion_tokens == 2


def test_a_client_that_hangs_up_before_its_answer_stops_it_too(url, server):
    conn = connect(url)
    conn.request("POST", TEXT, body=json.dumps({"prompt": "Go", "max_tokens": 1900, "temperature": 0}))
    wait_busy(url)
    conn.sock.close()
    conn.close()
    wait_idle(url)
    assert server["log"].read_text().count("finish: client hung up") == 2


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
        conn.request("POST", TEXT, body=json.dumps({"prompt": "Go", "max_tokens": 1900, "stream": True}))
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: {")  # generating
        process[0].send_signal(signal.SIGINT)
        events = resp.read().decode().split("\n\n")
        assert process[0].wait(timeout=60) == 0
    assert "the server is shutting down" in events[-3] and events[-2] == "data: [DONE]"
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
