"""`elm-mlx serve` facing hostile clients (issue 9's server rows): who may ask (Host check
against DNS rebinding, local Origins only unless --allowed-origins, CORS preflight, --api-key),
requests abandoned while queued leave nothing behind, and a soak of 300+ mixed good, malformed,
cancelled and abandoned requests ends healthy: nothing queued or running, no pending tasks,
memory within 20 MB of where it started. Loopback only."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import connect, request, running_server, wait_idle

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = "https://app.example"
CHAT, TEXT = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory, instruct_folder):
    folder = instruct_folder
    log = tmp_path_factory.mktemp("server") / "serve.log"
    process = []
    with running_server(folder, log, "--dtype", "fp32", "--max-tokens", "4", "--max-batch", "2", "--api-key", KEY,
                        "--allowed-origins", ALLOWED, process=process) as url:
        yield {"url": url, "pid": process[0].pid, "log": log}


@pytest.fixture(scope="module")
def url(server):
    return server["url"]


def health(url):
    return request(url, "GET", "/health")[1]


def post(url, path, body, **headers):
    return request(url, "POST", path, body, headers=AUTH | headers)


GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_host_headers_not_naming_this_machine_are_refused(url):
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "10.0.0.1"):
        status, reply = post(url, CHAT, GOOD, Host=host)
        assert status == 403 and reply["error"]["code"] == "host_not_allowed", host
        assert request(url, "GET", "/", headers={"Host": host})[0] == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        assert post(url, CHAT, GOOD, Host=host)[0] == 200, host


def test_only_local_and_allowed_origins_may_call_it_from_a_browser(url):
    status, reply = post(url, CHAT, GOOD, Origin="http://evil.example")
    assert status == 403 and "--allowed-origins" in reply["error"]["message"]
    assert post(url, CHAT, GOOD, Origin="null")[0] == 403  # sandboxed frames, file:// pages
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", ALLOWED, url):
        conn = connect(url)
        conn.request("POST", CHAT, json.dumps(GOOD), {"Content-Type": "application/json", "Origin": origin, **AUTH})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") == origin, origin
        conn.close()


def test_cors_preflight_is_answered_for_allowed_origins_only(url):
    def preflight(origin):
        conn = connect(url)
        conn.request("OPTIONS", CHAT, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization, content-type"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    ok = preflight(ALLOWED)
    assert ok.status == 204 and ok.getheader("Access-Control-Allow-Origin") == ALLOWED
    assert "POST" in ok.getheader("Access-Control-Allow-Methods")
    assert "authorization" in ok.getheader("Access-Control-Allow-Headers").lower()
    assert preflight("https://evil.example").status == 403


def test_the_api_key_is_required_on_the_api_only(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, reply = request(url, "POST", CHAT, GOOD, headers=headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        said = reply["error"]["message"]
        assert ("key sent is wrong" in said) == bool(headers) and ("needs an API key" in said) == (not headers)
    assert request(url, "GET", "/v1/models")[0] == 401
    assert request(url, "GET", "/v1/models", headers=AUTH)[0] == 200
    assert request(url, "GET", "/health")[0] == 200 and request(url, "GET", "/")[0] == 200


def long_stream(url):
    """A streamed request that holds a batch slot until its connection is closed."""
    conn = connect(url)
    body = {"prompt": "Go", "max_tokens": 1900, "temperature": 0, "stream": True}
    conn.request("POST", TEXT, json.dumps(body), {"Content-Type": "application/json", **AUTH})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: {")
    return conn


def test_requests_abandoned_while_queued_leave_no_handler_behind(url):
    wait_idle(url)
    before = health(url)
    holders = [long_stream(url) for _ in range(2)]  # the whole batch (--max-batch 2)
    abandoned = []
    for i in range(20):
        conn = connect(url)
        conn.request("POST", TEXT, json.dumps({"prompt": f"Wait {i}", "max_tokens": 3}),
                     {"Content-Type": "application/json", **AUTH})
        abandoned.append(conn)
    deadline = time.monotonic() + 60
    while health(url)["queued"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(url)["queued"] == 20
    for conn in abandoned:
        conn.sock.close()
    while health(url)["queued"] and time.monotonic() < deadline:  # they leave the queue without running
        time.sleep(0.05)
    for conn in holders:
        conn.sock.close()
    wait_idle(url)
    after = health(url)
    assert after["tasks"] <= before["tasks"] and after["active"] == after["queued"] == 0
    cancelled, finished = after["cancelled"] - before["cancelled"], after["finished"] - before["finished"]
    assert cancelled >= 20 and cancelled + finished == 22  # none of the 20 ran; the 2 holders ran or were cut


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


MALFORMED = [b"{not json", b"[1]", b"\xff", b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
             b"[" * 20_000, json.dumps({"messages": [], "max_tokens": 2}).encode(),
             json.dumps(GOOD | {"tools": [{"type": "function"}]}).encode(),
             json.dumps(GOOD | {"temperature": 9}).encode()]


def one_soak_request(url: str, i: int) -> str:
    rng = random.Random(i)
    kind = ["good", "good_stream", "malformed", "cancelled", "abandoned"][i % 5]
    if kind == "good":
        body = {"prompt": f"Soak {i}", "max_tokens": rng.randint(1, 3), "logprobs": rng.choice([None, 2])}
        status, reply = post(url, TEXT, body)
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1
    elif kind == "good_stream":
        body = GOOD | {"stream": True, "messages": [{"role": "user", "content": f"Soak {i}"}]}
        status, text = post(url, CHAT, body)
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
    elif kind == "malformed":
        status, reply = post(url, CHAT, MALFORMED[i // 5 % len(MALFORMED)])
        assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    else:
        conn = connect(url)
        body = {"prompt": f"Soak {i}", "max_tokens": 50, "stream": kind == "cancelled"}
        conn.request("POST", TEXT, json.dumps(body), {"Content-Type": "application/json", **AUTH})
        if kind == "cancelled":
            conn.getresponse().readline()
        conn.sock.close()
        conn.close()
    return kind


def test_a_soak_of_mixed_requests_ends_healthy(server, url):
    for i in range(20):  # warm up every path before the memory baseline
        one_soak_request(url, i)
    wait_idle(url)
    start, rss0 = health(url), rss_kb(server["pid"])
    with ThreadPoolExecutor(8) as pool:
        kinds = list(pool.map(lambda i: one_soak_request(url, i), range(20, 340)))
    assert len(kinds) == 320 and set(kinds) == {"good", "good_stream", "malformed", "cancelled", "abandoned"}
    wait_idle(url, timeout=120)
    end = health(url)
    assert end["status"] == "ok" and end["active"] == end["queued"] == 0
    assert end["tasks"] <= start["tasks"]
    assert end["requests"] - start["requests"] <= 320 - 64  # the malformed never reached the engine
    growth_mb = (rss_kb(server["pid"]) - rss0) / 1024
    assert growth_mb < 20, f"RSS grew {growth_mb:.1f} MB over the soak"
    assert "Traceback" not in server["log"].read_text()
