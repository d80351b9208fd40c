"""Structured output (elm_mlx/constrain.py, llguidance) on a random-weight model over the
real 32000-piece vocabulary: free text is noise, so only the constraint can make output valid."""

import json

import jsonschema
import numpy as np
import pytest

from elm_mlx.constrain import Constraint
from elm_mlx.errors import ElmError
from elm_mlx.generate import generate_tokens

EOS = 2
PROMPT = [1, 450, 1234, 29901]


def run(model, tok, constraint, *, temp=0.0, seed=0, limit=400, compile=True):
    out = []
    for t in generate_tokens(model, PROMPT, temp=temp, seed=seed, constraint=constraint, compile=compile):
        if t == EOS:
            return out, True
        out.append(t)
        if len(out) >= limit:
            return out, False
    raise AssertionError


def text_of(tok, ids):
    d = tok.detokenizer(continuation=True)
    for i in ids:
        d.add_token(i)
    d.finalize()
    return d.text


def random_schema(rng):
    props = {}
    for k in range(int(rng.integers(1, 4))):
        kind = rng.choice(["string", "integer", "enum", "bools"])
        if kind == "string":
            lo = int(rng.integers(0, 3))
            props[f"s{k}"] = {"type": "string", "minLength": lo, "maxLength": lo + int(rng.integers(0, 6))}
        elif kind == "integer":
            lo = int(rng.integers(-50, 50))
            props[f"i{k}"] = {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 200))}
        elif kind == "enum":
            props[f"e{k}"] = {"enum": ["red", "green", "blue"][: int(rng.integers(1, 4))]}
        else:
            props[f"b{k}"] = {"type": "array", "items": {"type": "boolean"}, "maxItems": int(rng.integers(0, 4))}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


@pytest.mark.parametrize("case", range(12))
def test_random_schemas_sampled_outputs_are_valid(tiny32k_model, tok, case):
    rng = np.random.default_rng(case)
    schema = random_schema(rng)
    c = Constraint(tok, json_schema=schema, vocab_size=tiny32k_model.config.vocab_size)
    ids, stopped = run(tiny32k_model, tok, c, temp=1.0, seed=case)
    assert stopped, "EOS must come once the schema is complete"
    value = json.loads(text_of(tok, ids))
    jsonschema.validate(value, schema)
    assert c.masks == len(ids) + 1


def test_json_object_gives_an_object(tiny32k_model, tok):
    c = Constraint(tok, json_object=True, vocab_size=tiny32k_model.config.vocab_size)
    ids, stopped = run(tiny32k_model, tok, c, temp=0.0, limit=200)
    if stopped:
        assert isinstance(json.loads(text_of(tok, ids)), dict)
    else:  # greedy on noise may run long: the prefix is still an object's start
        assert text_of(tok, ids).startswith("{")


def test_regex_constrains_every_token(tiny32k_model, tok):
    c = Constraint(tok, regex=r"[0-9]{3}-[a-z]{2}", vocab_size=tiny32k_model.config.vocab_size)
    ids, stopped = run(tiny32k_model, tok, c, temp=1.0, seed=4)
    import re
    assert stopped and re.fullmatch(r"[0-9]{3}-[a-z]{2}", text_of(tok, ids))


def test_eos_only_when_accepting(tok):
    c = Constraint(tok, json_schema={"type": "object", "properties": {"a": {"type": "boolean"}},
                                     "required": ["a"], "additionalProperties": False})
    assert not bool(c.allowed()[EOS].item())


class Spy:
    """A constraint that records whether the unconstrained greedy choice was allowed."""

    def __init__(self, inner):
        self.inner, self.masks = inner, []

    def allowed(self):
        m = self.inner.allowed()
        self.masks.append(np.array(m))
        return m

    def advance(self, token):
        self.inner.advance(token)


@pytest.mark.parametrize("compile", [True, False])
def test_constrained_greedy_equals_unconstrained_while_allowed(tiny32k_model, tok, compile):
    # Unconstrained greedy tokens; the constrained run must match them up to the first
    # one the grammar forbids (a permissive regex makes that point come late).
    free = []
    for t in generate_tokens(tiny32k_model, PROMPT, temp=0.0, compile=compile):
        free.append(t)
        if len(free) == 30:
            break
    c = Spy(Constraint(tok, regex=r"(?s:.{0,400})", vocab_size=tiny32k_model.config.vocab_size))
    got, _ = run(tiny32k_model, tok, c, limit=30, compile=compile)
    n = 0
    while n < len(free) and c.masks[n][free[n]]:
        assert got[n] == free[n]
        n += 1
    assert n > 0


def test_unsupported_schema_feature_is_an_error_naming_it(tok):
    with pytest.raises(ElmError, match="json_schema.*format"):
        Constraint(tok, json_schema={"type": "string", "format": "no-such-format"})
    with pytest.raises(ElmError, match="json_schema: expected a JSON object"):
        Constraint(tok, json_schema="[1, 2")


def test_schema_compiled_once(tok):
    from elm_mlx import constrain

    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    Constraint(tok, json_schema=schema)
    before = constrain._compiled.cache_info().hits
    Constraint(tok, json_schema=dict(reversed(list(schema.items()))))  # same schema, other key order
    assert constrain._compiled.cache_info().hits == before + 1


# ---- CLI and API ----------------------------------------------------------------------------

CLI_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
              "required": ["name", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    from conftest import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny32k_structured"))


def test_cli_generate_json_schema_prints_a_valid_instance(with_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(CLI_SCHEMA))
    for arg in (str(schema_file), json.dumps(CLI_SCHEMA)):
        r = CliRunner().invoke(app, ["generate", "-M", str(with_tokenizer), "Data:", "-m", "200", "--temp", "1",
                                     "--seed", "1", "--json-schema", arg])
        assert r.exit_code == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), CLI_SCHEMA)


def test_cli_unsupported_feature_is_one_error_line_exit_2(with_tokenizer):
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    r = CliRunner().invoke(app, ["generate", "-M", str(with_tokenizer), "x", "--json-schema",
                                 '{"type": "string", "format": "no-such-format"}'])
    assert r.exit_code == 2 and "json_schema" in r.stderr and "format" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_api_keywords_build_the_constraint(tiny32k_model, tok):
    from elm_mlx.generate import generate

    text = generate(tiny32k_model, tok, "Data:", 200, json_schema=CLI_SCHEMA, temp=1.0, seed=2)
    jsonschema.validate(json.loads(text), CLI_SCHEMA)
    text = generate(tiny32k_model, tok, "Data:", 50, regex=r"(yes|no)", temp=1.0, seed=2)
    assert text in ("yes", "no")


# ---- server -----------------------------------------------------------------------------------

STRICT = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green", "blue"]},
                         "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
          "required": ["name", "age", "color", "flags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server_url(with_tokenizer, tmp_path_factory):
    from serving import running_server

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(with_tokenizer, log, "--dtype", "fp32", "--max-tokens", "300") as url:
        yield url, log


def test_server_burst_of_strict_schemas_beside_an_unconstrained_request(server_url):
    from concurrent.futures import ThreadPoolExecutor

    from serving import request

    url, log = server_url
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": STRICT, "strict": True}}
    free = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    bodies = [{"prompt": f"Person {i}:", "temperature": 1.0, "seed": i, "response_format": fmt} for i in range(8)]
    with ThreadPoolExecutor(9) as pool:
        results = list(pool.map(lambda b: request(url, "POST", "/v1/completions", b), bodies + [free]))
    for status, body in results[:8]:
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), STRICT)
        assert body["usage"]["mask_ms_per_token"] > 0
    status, alone = request(url, "POST", "/v1/completions", free)
    assert status == 200 and results[8][1]["choices"][0]["text"] == alone["choices"][0]["text"]
    assert "structured output mask" in log.read_text()


def test_server_chat_json_object_streamed_gives_an_object(server_url):
    from serving import request

    url, _ = server_url
    body = {"messages": [{"role": "user", "content": "Give me JSON"}], "temperature": 1.0, "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": STRICT}},
            "stream": False}
    status, r = request(url, "POST", "/v1/chat/completions", body)
    assert status == 200, r
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), STRICT)
    # json_object, streamed, on completions
    status, text = request(url, "POST", "/v1/completions", {"prompt": "x", "temperature": 1.0, "seed": 1,
                                                             "stream": True, "response_format": {"type": "json_object"}})
    assert status == 200
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    out = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    if finish == "stop":
        assert isinstance(json.loads(out), dict)
    else:
        assert out.lstrip().startswith("{")


def test_server_unsupported_schema_feature_is_a_400_naming_it(server_url):
    from serving import request

    url, _ = server_url
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such"}}}
    status, r = request(url, "POST", "/v1/completions", {"prompt": "x", "response_format": fmt})
    assert status == 400 and "format" in r["error"]["message"] and r["error"]["param"] == "response_format"
    status, r = request(url, "POST", "/v1/completions", {"prompt": "x", "response_format": {"type": "yaml"}})
    assert status == 400 and r["error"]["param"] == "response_format"
