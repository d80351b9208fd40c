"""`elm-mlx serve`: an OpenAI-compatible HTTP API over one model, and a chat page at /.

Starlette parses HTTP and uvicorn serves it. One worker thread owns the model
(all MLX work stays on that thread) and runs every request through one
`BatchEngine` (elm_mlx/batch.py): up to --max-batch requests decode together, one
token each per model pass, and the rest wait in arrival order. Each request gets
exactly the tokens it would get alone. Caches of finished requests are kept, so a
client that re-sends a growing conversation has only the new part read. A client
that hangs up has its generation stopped at the next token.

Request-sized work (JSON parsing, the chat template, tokenizing) runs on a thread
pool under a time limit, never on the event loop; bodies are capped; `Guard` decides
who may ask (Host, Origin, Content-Type, --api-key)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batch import MAX_TOP_LOGPROBS, BatchEngine
from .chat_template import ChatTemplate, chat_ids
from .errors import ArgumentError, ElmError
from .generate import ContextError, StopText, check_context
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
    `num_draft_tokens` (guesses of the server's --draft-model) as stream_generate keywords
    ({} for none); a request asking for lookup uses it instead of the draft model."""
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


def read_logprobs(body: dict, kind: str) -> int | None:
    """None (no logprobs), 0 (the chosen token's) or k (and the k most likely, k <= 10).
    Chat: logprobs (boolean) and top_logprobs; completions: logprobs (an integer)."""
    most = f"an integer from 0 to {MAX_TOP_LOGPROBS}"
    if kind == "text":
        return get(body, "logprobs", "integer", None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, most)
    wanted = get(body, "logprobs", "boolean", False)
    top = get(body, "top_logprobs", "integer", None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, most)
    if top is not None and not wanted:
        raise ApiError(400, "Invalid value for 'top_logprobs': it needs 'logprobs' set to true.", "top_logprobs",
                       "invalid_value")
    return (top or 0) if wanted else None


# Parameters a client may send that change nothing here (OpenAI's bookkeeping, or defaults).
IGNORED = {"user", "metadata", "service_tier", "store", "stream_options", "seed", "model"}
KNOWN = {
    "chat": {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "stream", "n", "logprobs",
             "top_logprobs", "response_format", "tools", "tool_choice", "functions", "function_call",
             "parallel_tool_calls", "logit_bias", "modalities", "audio", "prediction", "reasoning_effort",
             "web_search_options", "prompt_lookup", "num_draft_tokens"},
    "text": {"prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
             "frequency_penalty", "presence_penalty", "stop", "stream", "n", "logprobs", "echo", "best_of",
             "suffix", "logit_bias", "prompt_lookup", "num_draft_tokens", "response_format"},
}


def read_constraint(body: dict, tokenizer):
    """response_format as a Constraint (elm_mlx/constrain.py), or None for text. OpenAI's
    {"type": "json_object"} and {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
    extensions {"type": "grammar", "grammar": LARK} and {"type": "regex", "regex": RE}. A schema
    feature llguidance cannot enforce is a 400 naming it, never relaxed."""
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return None

    def bad(what):
        raise ApiError(400, f"Invalid value for 'response_format': {what}.", "response_format", "invalid_value")

    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema", "grammar", "regex"):
        bad('expected {"type": "text" | "json_object" | "json_schema" | "grammar" | "regex", ...}')
    kind = fmt["type"]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            bad('expected "json_schema": {"name": ..., "schema": {a JSON Schema object}, "strict": true}')
        args = dict(json_schema=spec["schema"])
    elif kind == "json_object":
        args = dict(json_object=True)
    elif kind == "text":
        return None
    else:
        if not isinstance(fmt.get(kind), str):
            bad(f'expected "{kind}": a string')
        args = {kind: fmt[kind]}
    from .constrain import Constraint

    try:
        return Constraint(tokenizer, **args)
    except ElmError as e:
        raise ApiError(400, f"'response_format' cannot be enforced: {e}", "response_format", "invalid_value") from None


def refuse_unsupported(body: dict, kind: str):
    """A 400 naming the first parameter this server would otherwise ignore while the client relies on it."""
    def no(name, what):
        raise ApiError(400, f"'{name}' is not supported by this server: {what}.", name, "unsupported_parameter")

    unknown = sorted(set(body) - KNOWN[kind] - IGNORED)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: '{unknown[0]}'.", unknown[0],
                       "unknown_parameter")
    for name in ("tools", "functions"):
        if body.get(name):
            no(name, "the model was not tuned to call tools")
    for name in ("tool_choice", "function_call", "parallel_tool_calls", "audio", "prediction", "reasoning_effort",
                 "web_search_options", "suffix"):
        if body.get(name) not in (None, "none", False, ""):
            no(name, "leave it out")
    if body.get("logit_bias"):
        no("logit_bias", "leave it out")
    if body.get("modalities") not in (None, ["text"]):
        no("modalities", 'only ["text"]')
    if body.get("store") is True:
        no("store", "nothing is stored")
    get(body, "echo", "boolean", False, lambda v: not v, "false (echo is not supported)")
    get(body, "best_of", "integer", 1, lambda v: v == 1, "1 (best_of is not supported)")


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

@dataclass(eq=False)
class Job:
    name: str  # e.g. "chat.completion chatcmpl-1a2b", for the log
    ids: list
    max_tokens: int
    sampling: SamplingParams
    stop: list
    loop: asyncio.AbstractEventLoop
    chat: bool = True  # a chat reply drops the first piece's SentencePiece space; a completion keeps it
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    speculation: dict = field(default_factory=dict)  # from read_speculation: verified inside the batch
    constraint: object = None  # structured output (elm_mlx/constrain.py): masks each token in the batch
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    # the worker's
    seq: object = None
    detok: object = None
    stop_text: StopText | None = None
    first_at: float | None = None

    def emit(self, kind: str, value=None):
        # From the worker thread into the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # that loop has closed: nobody is listening any more
            pass


def token_entry(tokenizer, token: int, logprob: float, top) -> dict:
    """OpenAI's chat logprobs entry for one token (bytes let a client join split characters)."""
    def one(i, lp):
        data = tokenizer.token_bytes(i) or tokenizer.piece(i).encode()  # "</s>" for EOS
        return {"token": data.decode("utf-8", "replace"), "logprob": lp, "bytes": list(data)}

    return {**one(token, logprob), "top_logprobs": [one(i, lp) for i, lp in top or []]}


class Worker:
    """Owns the model on one thread and runs every request through one BatchEngine: up to
    max_batch decode together, the rest wait in its queue."""

    def __init__(self, load_model, tokenizer, max_batch: int, load_draft=None):
        self.jobs: queue.Queue = queue.Queue()
        self.draft = None
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.engine: BatchEngine | None = None
        self.active: dict = {}  # Sequence -> Job
        self.stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(load_model, load_draft), daemon=True,
                                       name="elm-mlx-worker")
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stats(self) -> dict:
        s = self.engine.stats()
        s["queued"] += self.jobs.qsize()
        return s

    def stop(self):
        """Ends the running and waiting requests (their clients are told) and then the thread,
        so that open streams close at once and no MLX work outlives the server."""
        self.stopping = True
        self.jobs.put(None)

    def _run(self, load_model, load_draft):
        try:
            # Loaded here: MLX streams belong to the thread that uses them.
            self.model = load_model()
            if load_draft is not None:
                self.draft = load_draft(self.model)
            self.engine = BatchEngine(self.model, self.max_batch)
            self.tokenizer.detokenizer()  # builds its table now, not in the first request
        except BaseException as e:  # reported by __init__, in the main thread
            self._error = e
            return
        finally:
            self._ready.set()
        while True:
            if not self._take(block=not self.engine.has_work()) or self.stopping:
                break
            for seq, job in self.active.items():
                if job.cancelled.is_set():
                    self.engine.cancel(seq)
            if not self.engine.has_work():
                continue
            try:
                for t in self.engine.step():
                    self._deliver(self.active[t.seq], t)
            except Exception as e:  # a failed step never takes the worker down: its requests get an error
                log.exception("a generation step failed")
                for job in self.active.values():
                    job.emit("error", f"generation failed: {e}")
                self.active.clear()
                totals, self.engine = self.engine.totals, BatchEngine(self.model, self.max_batch)
                self.engine.totals = totals
            for seq in [s for s in self.active if s.finish is not None]:
                self._done(self.active.pop(seq))
        for job in list(self.active.values()) + self._drain():
            job.emit("error", "the server is shutting down")

    def _drain(self) -> list:
        jobs = []
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return [j for j in jobs if j is not None]
            jobs.append(job)

    def _take(self, block: bool) -> bool:
        """New jobs into the engine (waiting for one when idle); False once told to stop."""
        jobs = [self.jobs.get()] if block else []
        jobs += self._drain() if jobs[-1:] != [None] else []
        if None in jobs or self.stopping:
            for job in jobs:
                if job is not None:
                    job.emit("error", "the server is shutting down")
            return False
        for job in jobs:
            if job.cancelled.is_set():  # its client left while it waited
                continue
            try:
                if job.constraint is not None:
                    job.constraint.vocab_size = self.model.config.vocab_size
                job.seq = self.engine.add(job.ids, job.max_tokens, eos_id=self.tokenizer.eos_id,
                                          logprobs=job.logprobs, constraint=job.constraint,
                                          proposer=self._proposer(job), **asdict(job.sampling))
            except ElmError as e:
                job.emit("error", str(e))
                continue
            job.detok = self.tokenizer.detokenizer(continuation=not job.chat)
            job.stop_text = StopText(job.stop)
            self.active[job.seq] = job
        return True

    def _proposer(self, job: Job):
        """The speculative proposer a request asked for (read_speculation's keywords), or None."""
        from .speculative import make_proposer

        spec = dict(job.speculation)
        if not spec:
            return None
        if spec.pop("use_draft", False):
            spec["draft_model"] = self.draft
        return make_proposer(self.model, repetition_penalty=job.sampling.repetition_penalty, **spec)

    def _deliver(self, job: Job, t):
        if job.first_at is None:
            job.first_at = time.perf_counter()
        if t.finish == "stop":  # EOS: its own text is not part of the reply
            text = job.detok.finalize()
        else:
            text = job.detok.add_token(t.token)
            if t.finish:
                text += job.detok.finalize()
        text, hit = job.stop_text.add(text)
        if t.finish and not hit:
            text += job.stop_text.flush()
        entry = None if t.logprob is None else token_entry(self.tokenizer, t.token, t.logprob, t.top_logprobs)
        if text or entry:
            job.emit("token", (text, entry))
        if hit:
            self.engine.cancel(job.seq, "stop")
            job.seq.finish = "stop"

    def _done(self, job: Job):
        seq, now = job.seq, time.perf_counter()
        n, finish = len(seq.tokens), seq.finish
        done = dict(finish_reason=finish, prompt_tokens=len(job.ids), completion_tokens=n)
        if seq.spec is not None:
            st = seq.spec.stats
            done.update(acceptance_rate=st.acceptance_rate, tokens_per_forward=st.tokens_per_forward)
        if job.constraint is not None:
            done["mask_ms_per_token"] = round(job.constraint.mask_ms_per_token, 4)
            log.info("%s: structured output mask %.3f ms/token over %d tokens", job.name,
                     job.constraint.mask_ms_per_token, job.constraint.masks)
        if finish != "cancelled":
            job.emit("done", done)
        first = job.first_at or now
        rate = (n - 1) / (now - first) if n > 1 and now > first else 0.0
        log.info("%s: %d prompt tokens (%d from the cache), %d generated, %.1f tok/s, first token after %.2f s, "
                 "finish: %s", job.name, len(job.ids), seq.reused, n, rate, first - job.created,
                 "client hung up" if finish == "cancelled" else finish)


# ---------------------------------------------------------------- HTTP

OBJECTS = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
           ("text", False): "text_completion", ("text", True): "text_completion"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(done: dict) -> dict:
    """OpenAI's usage object; speculative decoding adds acceptance_rate and tokens_per_forward."""
    p, c = done["prompt_tokens"], done["completion_tokens"]
    extra = {k: done[k] for k in ("acceptance_rate", "tokens_per_forward", "mask_ms_per_token") if k in done}
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, **extra}


def completion_logprobs(entries: list, offset: int) -> dict:
    """The legacy completions shape of the chat entries: parallel lists, text offsets from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


async def api_error(_, e: ApiError):
    return e.response()


async def user_error(_, e: ElmError):  # e.g. a chat template's raise_exception()
    return ApiError(400, str(e)).response()


async def http_error(request, e: HTTPException):
    return ApiError(e.status_code, f"{e.detail} ({request.method} {request.url.path})").response()


async def internal_error(_, e: Exception):
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").response()


class ClientGone(Exception):
    """A non-streamed request's client hung up before its answer."""


@dataclass
class Limits:
    max_body: int = 1 << 20  # bytes: a full 2048-token conversation is ~10 KB of JSON
    prepare_s: float = 10.0  # parsing, template rendering and tokenizing one request


class Api:
    def __init__(self, worker: Worker, tokenizer, template: ChatTemplate | None, model_id: str, defaults: Defaults,
                 window: int, vocab_size: int, limits: Limits = Limits()):
        self.worker, self.tokenizer, self.template = worker, tokenizer, template
        self.model_id, self.defaults, self.window, self.vocab_size = model_id, defaults, window, vocab_size
        self.limits = limits
        self.page = files("elm_mlx").joinpath("static/index.html").read_text(encoding="utf-8")
        self.icon = files("elm_mlx").joinpath("static/favicon.svg").read_bytes()
        self.created = int(time.time())
        # Request-sized work runs here, off the event loop, so a big or slow request never
        # holds up /health or the other clients' streams.
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="elm-mlx-prepare")

    def app(self) -> Starlette:
        routes = [
            Route("/", lambda _: HTMLResponse(self.page)),
            Route("/favicon.ico", lambda _: Response(self.icon, media_type="image/svg+xml")),  # browsers ask for it
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/v1/models/{model:path}", self.model),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={
            ApiError: api_error, ElmError: user_error, HTTPException: http_error, Exception: internal_error})

    async def health(self, _):
        stats = self.worker.stats()
        return JSONResponse({"status": "ok", "model": self.model_id, "busy": stats["active"] > 0, **stats,
                             "tasks": len(asyncio.all_tasks())})

    async def models(self, _):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "elm-mlx"}]})

    async def model(self, request: Request):
        """GET /v1/models/{id}: openai's client.models.retrieve."""
        wanted = request.path_params["model"]
        if wanted != self.model_id:
            raise ApiError(404, f"The model {wanted!r} does not exist: this server serves {self.model_id!r}.",
                           param="model", code="model_not_found")
        return JSONResponse({"id": self.model_id, "object": "model", "created": self.created, "owned_by": "elm-mlx"})

    async def chat_completions(self, request: Request):
        raw = await self.read_body(request)
        body, ids = await self.prepare(raw, self.chat_prompt)
        return await self.run(request, body, ids, "chat", "messages")

    async def completions(self, request: Request):
        raw = await self.read_body(request)
        body, ids = await self.prepare(raw, self.text_prompt)
        return await self.run(request, body, ids, "text", "prompt")

    def chat_prompt(self, body: dict) -> list[int]:
        refuse_unsupported(body, "chat")
        return chat_ids(self.tokenizer, self.template, read_messages(body))

    def text_prompt(self, body: dict) -> list[int]:
        refuse_unsupported(body, "text")
        return read_prompt(body, self.tokenizer, self.vocab_size)

    async def read_body(self, request: Request) -> bytes:
        cap = self.limits.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise ApiError(413, f"The request body is {int(declared)} bytes; this server accepts at most {cap}.",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, f"The request body is over {cap} bytes, the most this server accepts.",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def prepare(self, raw: bytes, prompt_of) -> tuple[dict, list[int]]:
        """(body, prompt ids), parsed and rendered on the pool within limits.prepare_s."""
        def work():
            body = self.parse(raw)
            return body, prompt_of(body)

        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.wait_for(future, self.limits.prepare_s)
        except asyncio.TimeoutError:
            raise ApiError(400, f"Preparing this request (chat template, tokenizer) took over "
                           f"{self.limits.prepare_s:g} s; send a shorter one.", code="request_too_slow") from None

    def parse(self, raw: bytes) -> dict:
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate (\\ud800) fails here
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "We could not parse the JSON body of your request. Expected a JSON object.",
                           code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "The JSON body of your request is nested too deeply.", code="invalid_json") from None
        except UnicodeEncodeError:
            raise ApiError(400, "The JSON body of your request has a lone surrogate escape (such as \\ud800): "
                           "expected valid Unicode text.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"The request body must be a JSON object, not {json_type(body)}.", code="invalid_json")
        model = get(body, "model", "string", self.model_id)
        if model != self.model_id:
            raise ApiError(404, f"The model '{model}' does not exist: this server serves '{self.model_id}'.",
                           "model", "model_not_found")
        return body

    async def run(self, request: Request, body: dict, ids: list[int], kind: str, param: str):
        max_tokens, sampling, stop = read_sampling(body, self.defaults)
        logprobs = read_logprobs(body, kind)
        speculation = read_speculation(body, self.defaults, self.worker.draft is not None)
        if speculation and logprobs is not None:
            raise ApiError(400, "'logprobs' with speculative decoding is not supported: leave out one of them "
                           "(prompt_lookup: 0 turns speculation off).", "logprobs", "invalid_value")
        constraint = read_constraint(body, self.tokenizer)
        if constraint is not None and speculation:
            # Drafts are not verified against the mask: a constrained request never speculates. Asked
            # for explicitly, that is a 400; a server default (--prompt-lookup / --draft-model) is turned off.
            if body.get("prompt_lookup") or body.get("num_draft_tokens"):
                raise ApiError(400, "'prompt_lookup' / 'num_draft_tokens' with 'response_format' is not supported: "
                               "structured output never speculates (leave them out).", "response_format",
                               "invalid_value")
            speculation = {}
        stream = get(body, "stream", "boolean", False)
        options = get(body, "stream_options", "object", {})
        include_usage = get(options, "include_usage", "boolean", False)
        try:
            check_context(len(ids), self.window)
        except ContextError:
            raise ApiError(400, f"This model's maximum context length is {self.window} tokens. However, your "
                           f"{param} resulted in {len(ids)} tokens, and a reply needs at least one more.",
                           param, "context_length_exceeded") from None
        if self.worker.stopping:
            raise ApiError(503, "the server is shutting down", kind="server_error")
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        job = Job(f"{OBJECTS[kind, False]} {rid}", ids, max_tokens, sampling, stop, asyncio.get_running_loop(),
                  chat=kind == "chat", logprobs=logprobs, speculation=speculation, constraint=constraint)
        self.worker.jobs.put(job)
        head = {"id": rid, "object": OBJECTS[kind, stream], "created": int(time.time()), "model": self.model_id}
        offset = len(body["prompt"]) if kind == "text" and isinstance(body.get("prompt"), str) else 0
        if stream:
            return StreamingResponse(self.stream(job, head, kind, include_usage, offset),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, entries, done = await self.collect(request, job)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it
        lp = None
        if logprobs is not None:
            lp = {"content": entries} if kind == "chat" else completion_logprobs(entries, offset)
        message = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
        choice = {"index": 0, **message, "logprobs": lp, "finish_reason": done["finish_reason"]}
        return JSONResponse({**head, "choices": [choice], "usage": usage(done)})

    async def stream(self, job: Job, head: dict, kind: str, include_usage: bool, offset: int):
        def chunk(text=None, finish=None, entry=None):
            lp = None
            if entry is not None:
                lp = {"content": [entry]} if kind == "chat" else completion_logprobs([entry], offset)
            if kind == "chat":
                delta = {"content": text} if text is not None else {}
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        try:
            if kind == "chat":
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            while True:
                event, value = await job.events.get()
                if event == "token":
                    text, entry = value
                    yield chunk(text, entry=entry)
                    if entry is not None:
                        offset += len(entry["token"])
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

    async def collect(self, request: Request, job: Job) -> tuple[str, list, dict]:
        async def hang_up():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled.set()
            job.events.put_nowait(("gone", None))

        watcher = asyncio.ensure_future(hang_up())
        parts, entries = [], []
        try:
            while True:
                event, value = await job.events.get()
                if event == "token":
                    parts.append(value[0])
                    if value[1] is not None:
                        entries.append(value[1])
                elif event == "done":
                    return "".join(parts), entries, value
                elif event == "gone":
                    raise ClientGone
                else:
                    raise ApiError(503 if self.worker.stopping else 500, value, kind="server_error")
        finally:
            job.cancelled.set()  # harmless once done
            watcher.cancel()


# ---------------------------------------------------------------- who may ask

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_local_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host in LOCAL_NAMES or host.endswith(".localhost")


def host_of(header: str) -> str:
    """The name in a Host header ("[::1]:8080" -> "::1", "localhost:80" -> "localhost")."""
    if header.startswith("["):
        return header[1: header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware doing what ollama does for a server a browser can reach:
    - bound to loopback, it answers only Host headers naming this machine (a DNS-rebinding
      page's requests carry its own name);
    - requests from web pages (an Origin header) are refused unless the page is local, the
      server's own, or in --allowed-origins; allowed ones get CORS headers and preflights;
    - POSTs must be application/json (a form or text/plain POST needs no preflight);
    - with --api-key, /v1/ requests need "Authorization: Bearer KEY"."""

    def __init__(self, app, loopback: bool, allowed_origins: list[str], api_key: str | None):
        self.app, self.loopback, self.api_key = app, loopback, api_key
        self.allowed = {o.rstrip("/") for o in allowed_origins}

    def origin_ok(self, origin: str, host: str) -> bool:
        if "*" in self.allowed or origin.rstrip("/") in self.allowed:
            return True
        u = urlsplit(origin)
        return u.scheme in ("http", "https") and (u.netloc == host or is_local_name(u.hostname or ""))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin, method = headers.get("host", ""), headers.get("origin"), scope["method"]

        def refuse(status, message, code):
            return ApiError(status, message, code=code).response()(scope, receive, send)

        if self.loopback and not is_local_name(host_of(host)):
            return await refuse(403, f"Host {host!r} is not this machine: a server on loopback answers only "
                                "localhost, 127.0.0.1 and [::1] (a guard against DNS rebinding).", "host_not_allowed")
        if origin is not None and not self.origin_ok(origin, host):
            return await refuse(403, f"Origin {origin!r} may not use this server; start it with --allowed-origins "
                                f"{origin} to allow that page.", "origin_not_allowed")
        cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if origin else []
        if method == "OPTIONS" and origin and "access-control-request-method" in headers:
            allow = headers.get("access-control-request-headers", "authorization, content-type")
            return await Response(status_code=204, headers={
                "Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Allow-Headers": allow,
            })(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": list(message.get("headers", [])) + cors}
            await send(message)

        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                if given:
                    why = ("The API key sent is wrong: send 'Authorization: Bearer KEY' with the --api-key this "
                           "server was started with.")
                else:
                    why = ("This server needs an API key: send 'Authorization: Bearer KEY' (the --api-key it was "
                           "started with).")
                return await ApiError(401, why, code="invalid_api_key").response()(scope, receive, send_with_cors)
        if method == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await ApiError(415, f"Content-Type {ctype or '(none)'!r}: expected application/json.",
                                      code="unsupported_media_type").response()(scope, receive, send_with_cors)
        return await self.app(scope, receive, send_with_cors)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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


def default_max_batch() -> int:
    """8 on a CPU (a step's cost grows little up to ~8 rows there); 16 on a GPU."""
    import mlx.core as mx

    return 16 if mx.default_device() == mx.gpu else 8


def serve(name: str, host: str, port: int, defaults: Defaults, dtype=None, tokenizer_file=None,
          template_file=None, no_template=False, max_batch: int | None = None, log_level: str = "info",
          allowed_origins: tuple = (), api_key: str | None = None, draft_model: str | None = None,
          adapter_path=None):
    """adapter_path: one LoRA/DoRA adapter applied to the served model for every request
    (the batch engine runs one set of weights; per-request adapters are not offered)."""
    from .chat_template import choose_template
    from .hub import resolve
    from .load import compute_dtype, load_model
    from .tokenizer import load_tokenizer

    folder = resolve(name, dtype, tokenizer_file)
    tokenizer = load_tokenizer(folder, tokenizer_file)
    template = choose_template(folder, name, template_file, no_template)
    if adapter_path is not None:
        from .lora import read_adapter_config

        read_adapter_config(adapter_path)  # before binding: fail fast
    max_batch = default_max_batch() if max_batch is None else max_batch
    if max_batch < 1:
        raise ElmError(f"--max-batch {max_batch}: expected >= 1")
    sock = bind(host, port)
    load_draft = None
    if draft_model is not None:
        from .speculative import load_draft as load_checked

        def load_draft(target):
            return load_checked(draft_model, target, tokenizer, dtype, tokenizer_file)
    worker = Worker(lambda: load_model(folder, compute_dtype(dtype), adapter_path), tokenizer, max_batch, load_draft)
    model = worker.model
    model_id = folder.name if Path(name).expanduser().exists() else name  # a preset or hub id as given
    api = Api(worker, tokenizer, template, model_id, defaults, model.config.max_context_length,
              model.config.vocab_size)
    host_, port_ = sock.getsockname()[:2]
    url = f"http://[{host_}]:{port_}" if ":" in host_ else f"http://{host_}:{port_}"
    chat = f"chat template {template.origin}" if template else "no chat template: messages are read as typed"
    print(f"elm-mlx: serving {model_id} ({chat}, up to {max_batch} requests decoding together) on {url} - chat page at {url}/, API at {url}/v1", flush=True)
    app = Guard(api.app(), is_loopback(host_), list(allowed_origins), api_key)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3)
    try:
        StoppingServer(config, worker).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass
    finally:
        worker.stop()
        worker.thread.join(timeout=60)
