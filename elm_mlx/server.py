"""`elm-mlx serve`: an OpenAI-compatible HTTP API over one model, and a chat page at /.

Starlette parses HTTP and uvicorn serves it. One worker thread owns the model
(all MLX work stays on that thread) and runs requests one model pass at a time,
in arrival order: others wait in its queue. It keeps the KV cache of the last
prompt, so a client that re-sends a growing conversation only has the new part
read. A client that hangs up has its generation stopped at the next token."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .chat_template import ChatTemplate, chat_ids
from .context import CachedContext
from .errors import ArgumentError, ElmError
from .generate import ContextError, check_context
from .sample import SamplingParams

log = logging.getLogger("uvicorn.error")  # uvicorn's handler and format


# ---------------------------------------------------------------- errors and request checks

class ApiError(Exception):
    """Answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


TYPES = {"integer": ("integer",), "number": ("integer", "number"), "boolean": ("boolean",),
         "string": ("string",), "object": ("object",)}


def get(body: dict, name: str, kind: str, default=None, ok=lambda v: True, want: str = ""):
    """body[name] when it has JSON type `kind` and passes `ok`; default when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if json_type(v) not in TYPES[kind]:
        raise ApiError(400, f"Invalid type for '{name}': expected {a(kind)}, but got {a(json_type(v))} instead.",
                       name, "invalid_type")
    if not ok(v):
        raise ApiError(400, f"Invalid value for '{name}': {json.dumps(v)}. Expected {want}.", name, "invalid_value")
    return v


@dataclass
class Defaults:
    """For requests that leave a parameter out: the command line's."""
    max_tokens: int
    sampling: SamplingParams
    prompt_lookup: int = 0  # speculative decoding (elm_mlx/speculative.py), 0: off
    ngram: int = 2
    num_draft_tokens: int = 3  # used when the server has a --draft-model


# The API's names for SamplingParams' fields (the others are the same, as extensions).
OPENAI_NAMES = {"temp": "temperature"}


def read_sampling(body: dict, d: Defaults) -> tuple[int, SamplingParams, list[str]]:
    get(body, "n", "integer", 1, lambda v: v == 1, "1 (one choice per request)")
    at_least_one = dict(ok=lambda v: v >= 1, want="an integer >= 1")
    max_tokens = get(body, "max_completion_tokens", "integer", None, **at_least_one)  # the newer name
    max_tokens = get(body, "max_tokens", "integer", max_tokens or d.max_tokens, **at_least_one)
    given = {}
    for name in asdict(d.sampling):
        param = OPENAI_NAMES.get(name, name)
        kind = "integer" if name in ("top_k", "seed") else "number"
        value = get(body, param, kind)
        if value is not None:
            given[name] = value
    try:
        sampling = replace(d.sampling, **given)
    except ArgumentError as e:
        param = OPENAI_NAMES.get(e.name, e.name)
        raise ApiError(400, f"Invalid value for '{param}': {json.dumps(e.value)}. Expected {e.want}.", param,
                       "invalid_value") from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4
                                 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "Invalid value for 'stop': expected a non-empty string or an array of up to 4 of them.",
                       "stop", "invalid_value")
    return max_tokens, sampling, stop or []


def read_speculation(body: dict, d: Defaults, has_draft: bool) -> dict:
    """The extensions `prompt_lookup` (N guesses by prompt lookup; 0 turns it off) and
    `num_draft_tokens` (guesses of the server's --draft-model) as stream_generate keywords;
    a request asking for lookup uses it instead of the draft model."""
    lookup = get(body, "prompt_lookup", "integer", d.prompt_lookup, lambda v: v >= 0, "an integer >= 0 (0 is off)")
    drafts = get(body, "num_draft_tokens", "integer", None, lambda v: v >= 1, "an integer >= 1")
    if drafts is not None and not has_draft:
        raise ApiError(400, "Invalid value for 'num_draft_tokens': this server has no draft model (start it with "
                       "--draft-model).", "num_draft_tokens", "invalid_value")
    if lookup:
        return dict(prompt_lookup=lookup, ngram=d.ngram)
    if has_draft:
        return dict(num_draft_tokens=drafts or d.num_draft_tokens, use_draft=True)
    return {}


def text_of(content, where: str) -> str:
    """A message's content: a string, or an array of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"Invalid value for '{where}': expected a string or an array of text parts "
                   "({\"type\": \"text\", \"text\": ...}); this model reads text only.", where, "invalid_value")


def read_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Invalid value for 'messages': expected a non-empty array of messages.", "messages",
                       "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"Invalid type for '{where}': expected an object, but got {a(json_type(m))} "
                           "instead.", where, "invalid_type")
        role = "system" if m.get("role") == "developer" else m.get("role")  # OpenAI's newer name for it
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"Invalid value for '{where}.role': {json.dumps(m.get('role'))}. Expected 'system', "
                           "'user' or 'assistant'.", f"{where}.role", "invalid_value")
        out.append({"role": role, "content": text_of(m.get("content"), f"{where}.content")})
    return out


def read_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if (isinstance(prompt, list) and prompt
            and all(json_type(t) == "integer" and 0 <= t < vocab_size for t in prompt)):
        return list(prompt)
    if prompt is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    raise ApiError(400, f"Invalid value for 'prompt': expected a string or a non-empty array of token ids "
                   f"(0 to {vocab_size - 1}); one prompt per request.", "prompt", "invalid_value")


# ---------------------------------------------------------------- generation

class StopText:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def add(self, text: str) -> tuple[str, bool]:
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending = self.pending[: min(found)], ""
            return out, True
        held = next((k for k in range(len(self.pending), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        out, self.pending = self.pending[: len(self.pending) - held], self.pending[len(self.pending) - held:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    name: str  # e.g. "chat.completion chatcmpl-1a2b", for the log
    ids: list
    max_tokens: int
    sampling: SamplingParams
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    speculation: dict = field(default_factory=dict)  # from read_speculation

    def emit(self, kind: str, value=None):
        # From the worker thread into the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # that loop has closed: nobody is listening any more
            pass


class Worker:
    """Owns the model on one thread and runs jobs one at a time, in arrival order."""

    def __init__(self, load_model, tokenizer, compile: bool = True, load_draft=None):
        self.compile = compile
        self.jobs: queue.Queue = queue.Queue()
        self.draft = None
        self.tokenizer = tokenizer
        self.busy = False
        self.current: Job | None = None
        self.stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(load_model, load_draft), daemon=True,
                                       name="elm-mlx-worker")
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self):
        """Ends the running and waiting requests (their clients are told) and then the thread,
        so that open streams close at once and no MLX work outlives the server."""
        self.stopping = True
        if self.current is not None:
            self.current.cancelled.set()
        self.jobs.put(None)

    def _run(self, load_model, load_draft):
        try:
            # Loaded here: MLX streams belong to the thread that uses them.
            self.context = CachedContext(load_model(), self.compile)
            if load_draft is not None:
                self.draft = load_draft(self.context.model)
            self.tokenizer.detokenizer()  # builds its table now, not in the first request
        except BaseException as e:  # reported by __init__, in the main thread
            self._error = e
            return
        finally:
            self._ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.stopping:
                job.emit("error", "the server is shutting down")
                continue
            if job.cancelled.is_set():  # its client left while it waited
                continue
            self.busy, self.current = True, job
            try:
                self._generate(job)
            except Exception as e:  # a bad request never takes the worker down
                log.exception("%s failed", job.name)
                job.emit("error", f"generation failed: {e}")
            finally:
                self.busy, self.current = False, None

    def _generate(self, job: Job):
        stop, n, finish, last = StopText(job.stop), 0, None, None
        spec = dict(job.speculation)
        if spec.pop("use_draft", False):
            spec["draft_model"] = self.draft
        with closing(self.context.stream(self.tokenizer, job.ids, job.max_tokens, sampling=job.sampling,
                                         **spec)) as stream:
            for r in stream:
                last = r
                n += 1
                text, hit = stop.add(r.text)
                if r.finish_reason and not hit:
                    text += stop.flush()
                if text:
                    job.emit("text", text)
                finish = "stop" if hit else r.finish_reason
                if finish:
                    break
                if job.cancelled.is_set() or self.stopping:
                    finish = "server stopping" if self.stopping else "client hung up"
                    break
        if self.stopping:
            job.emit("error", "the server is shutting down")
        else:
            done = dict(finish_reason=finish or "length", prompt_tokens=len(job.ids), completion_tokens=n)
            if last is not None and last.acceptance_rate is not None:
                done.update(acceptance_rate=last.acceptance_rate, tokens_per_forward=last.tokens_per_forward)
            job.emit("done", done)
        log.info("%s: %d prompt tokens (%d from the cache), %d generated, finish: %s",
                 job.name, len(job.ids), self.context.reused, n, finish)


# ---------------------------------------------------------------- HTTP

OBJECTS = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
           ("text", False): "text_completion", ("text", True): "text_completion"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(done: dict) -> dict:
    """OpenAI's usage object; speculative decoding adds acceptance_rate and tokens_per_forward."""
    p, c = done["prompt_tokens"], done["completion_tokens"]
    extra = {k: done[k] for k in ("acceptance_rate", "tokens_per_forward") if k in done}
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, **extra}


async def api_error(_, e: ApiError):
    return e.response()


async def user_error(_, e: ElmError):  # e.g. a chat template's raise_exception()
    return ApiError(400, str(e)).response()


async def http_error(request, e: HTTPException):
    return ApiError(e.status_code, f"{e.detail} ({request.method} {request.url.path})").response()


async def internal_error(_, e: Exception):
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()


class Api:
    def __init__(self, worker: Worker, tokenizer, template: ChatTemplate | None, model_id: str, defaults: Defaults,
                 window: int, vocab_size: int):
        self.worker, self.tokenizer, self.template = worker, tokenizer, template
        self.model_id, self.defaults, self.window, self.vocab_size = model_id, defaults, window, vocab_size
        self.page = files("elm_mlx").joinpath("static/index.html").read_text(encoding="utf-8")
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [
            Route("/", lambda _: HTMLResponse(self.page)),
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={
            ApiError: api_error, ElmError: user_error, HTTPException: http_error, Exception: internal_error})

    async def health(self, _):
        return JSONResponse({"status": "ok", "model": self.model_id, "busy": self.worker.busy,
                             "queued": self.worker.jobs.qsize()})

    async def models(self, _):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "elm-mlx"}]})

    async def chat_completions(self, request: Request):
        body = await self.body(request)
        ids = chat_ids(self.tokenizer, self.template, read_messages(body))
        return await self.run(request, body, ids, "chat", "messages")

    async def completions(self, request: Request):
        body = await self.body(request)
        get(body, "echo", "boolean", False, lambda v: not v, "false (echo is not supported)")
        get(body, "best_of", "integer", 1, lambda v: v == 1, "1 (best_of is not supported)")
        return await self.run(request, body, read_prompt(body, self.tokenizer, self.vocab_size), "text", "prompt")

    async def body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request. Expected a JSON object.",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"The request body must be a JSON object, not {json_type(body)}.", code="invalid_json")
        model = get(body, "model", "string", self.model_id)
        if model != self.model_id:
            raise ApiError(404, f"The model '{model}' does not exist: this server serves '{self.model_id}'.",
                           "model", "model_not_found")
        return body

    async def run(self, request: Request, body: dict, ids: list[int], kind: str, param: str):
        max_tokens, sampling, stop = read_sampling(body, self.defaults)
        speculation = read_speculation(body, self.defaults, self.worker.draft is not None)
        stream = get(body, "stream", "boolean", False)
        options = get(body, "stream_options", "object", {})
        include_usage = get(options, "include_usage", "boolean", False)
        try:
            check_context(len(ids), self.window)
        except ContextError:
            raise ApiError(400, f"This model's maximum context length is {self.window} tokens. However, your "
                           f"{param} resulted in {len(ids)} tokens, and a reply needs at least one more.",
                           param, "context_length_exceeded") from None
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        job = Job(f"{OBJECTS[kind, False]} {rid}", ids, max_tokens, sampling, stop, asyncio.get_running_loop(),
                  speculation=speculation)
        self.worker.jobs.put(job)
        head = {"id": rid, "object": OBJECTS[kind, stream], "created": int(time.time()), "model": self.model_id}
        if stream:
            return StreamingResponse(self.stream(job, head, kind, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, done = await self.collect(request, job)
        message = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
        choice = {"index": 0, **message, "logprobs": None, "finish_reason": done["finish_reason"]}
        return JSONResponse({**head, "choices": [choice], "usage": usage(done)})

    async def stream(self, job: Job, head: dict, kind: str, include_usage: bool):
        def chunk(text=None, finish=None):
            if kind == "chat":
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        try:
            if kind == "chat":
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            while True:
                event, value = await job.events.get()
                if event == "text":
                    yield chunk(value)
                    continue
                if event == "done":
                    yield chunk(finish=value["finish_reason"])
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(value)})
                else:
                    yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancelled.set()  # a client that hung up stops its generation; harmless once done

    async def collect(self, request: Request, job: Job) -> tuple[str, dict]:
        async def hang_up():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled.set()

        watcher = asyncio.ensure_future(hang_up())
        parts = []
        try:
            while True:
                event, value = await job.events.get()
                if event == "text":
                    parts.append(value)
                elif event == "done":
                    return "".join(parts), value
                else:
                    raise ApiError(503 if self.worker.stopping else 500, value, kind="server_error")
        finally:
            watcher.cancel()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ElmError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


class StoppingServer(uvicorn.Server):
    """Stops the worker as soon as a shutdown signal arrives: uvicorn then waits for open
    connections, and streams still generating would keep it waiting."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame):
        self.worker.stop()
        super().handle_exit(sig, frame)


def serve(name: str, host: str, port: int, defaults: Defaults, dtype=None, tokenizer_file=None,
          template_file=None, no_template=False, compile=True, draft_model: str | None = None):
    from .chat_template import choose_template
    from .hub import resolve
    from .load import compute_dtype, load_model
    from .tokenizer import load_tokenizer

    folder = resolve(name, dtype, tokenizer_file)
    tokenizer = load_tokenizer(folder, tokenizer_file)
    template = choose_template(folder, name, template_file, no_template)
    sock = bind(host, port)
    load_draft = None
    if draft_model is not None:
        from .speculative import load_draft as load_checked

        def load_draft(target):
            return load_checked(draft_model, target, tokenizer, dtype, tokenizer_file)
    worker = Worker(lambda: load_model(folder, compute_dtype(dtype)), tokenizer, compile, load_draft)
    model = worker.context.model
    model_id = folder.name if Path(name).expanduser().exists() else name  # a preset or hub id as given
    api = Api(worker, tokenizer, template, model_id, defaults, model.config.max_context_length,
              model.config.vocab_size)
    host_, port_ = sock.getsockname()[:2]
    url = f"http://[{host_}]:{port_}" if ":" in host_ else f"http://{host_}:{port_}"
    chat = f"chat template {template.origin}" if template else "no chat template: messages are read as typed"
    print(f"elm-mlx: serving {model_id} ({chat}) on {url} - chat page at {url}/, API at {url}/v1", flush=True)
    config = uvicorn.Config(api.app(), log_level="info", timeout_graceful_shutdown=3)
    try:
        StoppingServer(config, worker).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass
    finally:
        worker.stop()
        worker.thread.join(timeout=60)
