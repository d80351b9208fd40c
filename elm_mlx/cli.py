"""The `elm-mlx` command. Options that several commands take are declared once
below (typer `Annotated` aliases); each command parses its flags and calls one
function of the package.

Every command runs under `user_errors`: an ElmError (a problem the user can fix) is
one line and exit 2, an OSError one line naming the file, Ctrl-C exit 130 without a
traceback, anything else one line that says it is a bug. `--debug` (or
ELM_MLX_DEBUG=1) shows the traceback behind any of them."""

import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from . import __version__
from .errors import ArgumentError, ElmError, quoted

app = typer.Typer(
    help="Run Apple's OpenELM language models on MLX.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: wrapped to the terminal, nothing cut
)

# ---------------------------------------------------------------- options shared by commands
# Declared once. A group of options that several commands take is added to a
# command by a decorator that extends its signature (typer reads the signature)
# and hands the command one value built from them.

DtypeName = Literal["bf16", "fp16", "fp32"]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-M", help="A model folder (Apple's HF layout or `elm-mlx convert` output), a preset (270M, 450M, "
    "1_1B, 3B, each also -Instruct; see `elm-mlx models`) or a hub id (apple/OpenELM-3B). Presets and hub ids "
    "are downloaded once into the Hugging Face cache and converted once.")]
DtypeOpt = Annotated[Optional[DtypeName], typer.Option(
    help="Compute dtype. Default: fp32 on MLX's CPU backend (bf16 is several times slower there, also for "
    "quantized weights); elsewhere bf16 (as stored for converted folders).")]
NoCompileOpt = Annotated[bool, typer.Option(
    "--no-compile", help="Decode with the eager forward instead of the compiled step (same tokens, slower; the "
    "reference for comparisons).")]
TokenizerOpt = Annotated[Optional[Path], typer.Option(
    help="Llama-2 tokenizer.model to use when the model folder has none (Apple's repos ship none); otherwise "
    "it is rebuilt from the folder's tokenizer.json (mlx-lm's folders), else an ungated hub copy is fetched "
    "and checked.")]
AdapterPathOpt = Annotated[Optional[Path], typer.Option(
    "--adapter-path", help="A LoRA/DoRA adapter folder (adapter_config.json + adapters.safetensors, from "
    "`elm-mlx lora` or mlx_lm.lora) applied to the model.")]
MODEL_OPTIONS = {
    "model": ModelOpt,
    "dtype": DtypeOpt,
    "tokenizer": TokenizerOpt,
    "chat_template": Annotated[Optional[Path], typer.Option(
        help="A Jinja chat template (transformers' chat_template.jinja format) to use instead of the model's. "
        "-Instruct models get Apple's zephyr-style template without it.")],
    "no_chat_template": Annotated[bool, typer.Option(
        "--no-chat-template", help="Use no chat template: the text goes to the model as typed (base models "
        "never have one).")],
    "adapter_path": AdapterPathOpt,
}
SAMPLING_OPTIONS = {
    "temp": Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")],
    "top_k": Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 is off.")],
    "top_p": Annotated[float, typer.Option(
        help="Keep the smallest set of tokens with this much probability; 1 is off.")],
    "min_p": Annotated[float, typer.Option(help="Drop tokens less likely than min-p x the top one; 0 is off.")],
    "repetition_penalty": Annotated[float, typer.Option(
        help="Penalize every token already in the context (transformers' semantics); Apple suggests 1.2 for "
        "OpenELM. 1 is off.")],
    "seed": Annotated[Optional[int], typer.Option(help="Random seed for sampling.")],
}
SPECULATION_OPTIONS = {
    "prompt_lookup": Annotated[int, typer.Option(
        "--prompt-lookup", min=0, help="Prompt-lookup decoding: guess up to N tokens by finding the last --ngram "
        "tokens earlier in the prompt or reply and copying what followed; the model checks all guesses in one "
        "pass and keeps what it would have said (same output). Pays when the reply repeats the prompt (editing, "
        "quoting code). 0 is off; Apple's model card uses 10.")],
    "ngram": Annotated[int, typer.Option(
        "--ngram", min=1, help="With --prompt-lookup: tokens matched (falling back to fewer when none match).")],
    "draft_model": Annotated[Optional[str], typer.Option(
        "--draft-model", help="Draft-model decoding: a smaller OpenELM (270M for 1.1B or 3B), or this model "
        "quantized, guesses --num-draft-tokens tokens that the model checks in one pass (same output). Named as "
        "--model; it must share the model's tokenizer.")],
    "num_draft_tokens": Annotated[int, typer.Option(
        "--num-draft-tokens", min=1, help="With --draft-model: tokens the draft guesses per step.")],
}
PromptCacheOpt = Annotated[Optional[Path], typer.Option(
    "--prompt-cache", help="A file that keeps the KV cache between runs (safetensors, written atomically): "
    "generate saves the prompt and reply there and, next time, reads only what follows the longest prefix they "
    "share; chat keeps its conversation there and resumes it. A file made with another model, dtype or "
    "tokenizer is refused.")]


@dataclass
class ModelChoice:
    """What the model options say: which model, in which dtype, with which tokenizer and chat template."""
    model: str
    dtype: Optional[str]
    tokenizer: Optional[Path]
    chat_template: Optional[Path]
    no_chat_template: bool
    adapter_path: Optional[Path] = None

    def load(self):
        """(model, tokenizer carrying the chat template to use, or None)."""
        from . import load
        from .chat_template import choose_template
        from .hub import resolve

        folder = resolve(self.model, self.dtype, self.tokenizer)
        template = choose_template(folder, self.model, self.chat_template, self.no_chat_template)  # before the slow part
        model, tok = load(folder, dtype=self.dtype, tokenizer=self.tokenizer, adapter_path=self.adapter_path)
        tok.chat_template = template
        return model, tok


def no_cache_with_adapter(prompt_cache, choice: ModelChoice) -> None:
    """A prompt cache is keyed by the model folder, not an adapter: its KV would be the wrong model's."""
    if prompt_cache is not None and choice.adapter_path is not None:
        raise ElmError("--prompt-cache and --adapter-path together are not supported (the cache would not know "
                       "the adapter); fuse the adapter (elm-mlx fuse) and use the fused folder")


def option_group(options: dict, build, into: str, defaults: dict | None = None):
    """Adds `options` ({name: Annotated type}) to a command's signature, with
    `defaults`, and calls it with `into=build(**their values)` instead."""
    def wrap(fn):
        sig = inspect.signature(fn)
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                   default=(defaults or {}).get(name, inspect.Parameter.empty))
                 for name, kind in options.items()]
        kept = [p for p in sig.parameters.values() if p.name != into]

        @wraps(fn)
        def run(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in options}
            return fn(*args, **kwargs, **{into: build(**values)})

        required = [p for p in kept + added if p.default is inspect.Parameter.empty]
        optional = [p for p in kept + added if p.default is not inspect.Parameter.empty]
        run.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                    for p in required + optional])
        return run
    return wrap


def model_options(fn):
    return option_group(MODEL_OPTIONS, ModelChoice, "choice",
                        dict(dtype=None, tokenizer=None, chat_template=None, no_chat_template=False,
                             adapter_path=None))(fn)


def sampling_options(**defaults):
    """The sampling flags, handed to the command as one SamplingParams (validated there)."""
    from .sample import SamplingParams

    defaults = {"temp": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "seed": None,
                **defaults}
    return option_group(SAMPLING_OPTIONS, SamplingParams, "sampling", defaults)


def speculation_options(fn):
    """The speculative-decoding flags, handed to the command as one speculative.Speculation."""
    from .speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_NGRAM, Speculation

    return option_group(SPECULATION_OPTIONS, Speculation, "speculation",
                        dict(prompt_lookup=0, ngram=DEFAULT_NGRAM, draft_model=None,
                             num_draft_tokens=DEFAULT_DRAFT_TOKENS))(fn)


EXIT_USER_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130


_debug_flag = False  # --debug of the running command


def debugging() -> bool:
    return _debug_flag or os.environ.get("ELM_MLX_DEBUG", "") not in ("", "0")


def fail(message: str, code: int):
    """One line on stderr (plus the traceback under --debug) and the exit code."""
    if debugging():
        traceback.print_exc()
    if message:
        typer.echo(message, err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Print ElmError as one line and exit 2 (a bad argument value named as the flag the
    user typed), Ctrl-C as exit 130, anything else as one line, instead of a traceback."""
    @wraps(fn)
    def run(*args, **kwargs):
        import click

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort,
                click.exceptions.ClickException):
            raise
        except ArgumentError as e:
            fail(f"error: {e.as_flag()}", EXIT_USER_ERROR)
        except ElmError as e:
            fail(f"error: {e}", EXIT_USER_ERROR)
        except KeyboardInterrupt:
            fail("\ninterrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:  # `elm-mlx generate ... | head`: the reader left; nothing to say
            sys.stdout = open(os.devnull, "w")  # so the exit flush does not fail again
            fail("", EXIT_BUG)
        except OSError as e:
            from .files import describe_os_error

            where = f"{e.filename}: " if e.filename else ""
            fail(f"error: {where}{describe_os_error(e)}", EXIT_USER_ERROR)
        except MemoryError:
            fail("error: out of memory; try a smaller model, --quant q4, or close other programs", EXIT_USER_ERROR)
        except Exception as e:
            fail(f"error: unexpected {type(e).__name__}: {quoted(str(e), 300)} (a bug in elm-mlx; rerun with "
                 "--debug for the traceback and report it)", EXIT_BUG)
    return run


def show_version(value: bool):
    if value:
        typer.echo(f"elm-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                       help="Print the version and exit.")] = False,
                 debug: Annotated[bool, typer.Option("--debug", help="Show the traceback behind an error "
                                                     "(also: ELM_MLX_DEBUG=1).")] = False):
    """Run Apple's OpenELM language models on MLX."""
    global _debug_flag
    _debug_flag = debug


def read_stdin() -> str:
    """Standard input as text, strictly UTF-8."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ElmError(f"standard input is not UTF-8 text (byte {quoted(data[e.start:e.start + 1])} at offset "
                       f"{e.start}); convert it, e.g. with iconv -t UTF-8") from None
    # One trailing newline is echo's / an editor's, not the prompt's: without this `echo text | generate -`
    # continues differently from `generate text`. (llama.cpp's -f keeps it; we strip exactly one.)
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def one_prompt(argument: str | None, option: str | None) -> str:
    """The prompt from the argument or --prompt (exactly one); '-' reads standard input."""
    if (argument is None) == (option is None):
        raise ElmError("give the prompt once: as the argument or with --prompt/-p ('-' reads standard input)"
                       if argument is None else "the prompt is given twice (argument and --prompt): give one")
    prompt = argument if option is None else option
    return read_stdin() if prompt == "-" else prompt


def unescape(text: str) -> str:
    """A shell cannot type a newline easily: \\n, \\t and \\\\ in a --stop string are a newline, a tab, a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


JsonSchemaOpt = Annotated[Optional[str], typer.Option("--json-schema", help="Structured output: the text is "
                          "an instance of this JSON Schema (a file, or the JSON itself).")]
GrammarOpt = Annotated[Optional[Path], typer.Option("--grammar", help="Structured output: a Lark grammar file.")]
RegexOpt = Annotated[Optional[str], typer.Option("--regex", help="Structured output: the text matches this regex.")]


def structured_kwargs(json_schema: str | None, grammar: Path | None, regex: str | None) -> dict:
    """stream_generate's json_schema= / grammar= / regex= from the CLI flags (at most one)."""
    from .files import read_text

    given = {k: v for k, v in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex)) if v is not None}
    if len(given) > 1:
        raise ElmError("--json-schema, --grammar, --regex: expected at most one of them")
    if json_schema is not None and not json_schema.lstrip().startswith("{"):
        given["json_schema"] = read_text(Path(json_schema), "--json-schema")
    if grammar is not None:
        given["grammar"] = read_text(grammar, "--grammar")
    return given


@app.command(short_help="Continue a prompt, streaming the text.")
@user_errors
@speculation_options
@sampling_options()
@model_options
def generate(
    prompt: Annotated[Optional[str], typer.Argument(
        help="Text to continue ('-' reads standard input, less one trailing newline: echo's, so "
        "`echo text | ... -` equals `... text`). BOS is prepended. Or give it with --prompt.")] = None,
    prompt_option: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="The prompt, as mlx_lm.generate takes it (the same as the argument).")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(
        "--system-prompt", "--system", help="A system message before the prompt, in the chat template "
        "(-Instruct models; a base model has no template: put instructions in the prompt).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(
        "--stop", help="Stop where this text appears, leaving it out (repeat for several; \\n and \\t are a "
        "newline and a tab).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", min=0,
                                            help="Most tokens to generate; stops earlier at EOS.")] = 256,
    prompt_cache: PromptCacheOpt = None,
    no_compile: NoCompileOpt = False,
    json_schema: JsonSchemaOpt = None,
    grammar: GrammarOpt = None,
    regex: RegexOpt = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at EOS: generate exactly "
                                             "-m tokens (for benchmarks; as llama.cpp's).")] = False,
    *, choice: ModelChoice, sampling, speculation,
):
    """Continue a prompt, streaming the text to stdout and the speed to stderr.
    An -Instruct model gets the prompt as a user message in its chat template."""
    from . import stream_generate
    from .generate import stats_line

    prompt = one_prompt(prompt, prompt_option)
    stops = [unescape(s) for s in stop or []]
    no_cache_with_adapter(prompt_cache, choice)
    model, tok = choice.load()
    if system_prompt is not None and tok.chat_template is None:
        raise ElmError(f"--system-prompt: {choice.model} has no chat template (a base model, or "
                       "--no-chat-template): put the instructions in the prompt, or use an -Instruct model")
    spec = speculation.generate_kwargs(model, tok, choice.dtype, choice.tokenizer)
    structured = structured_kwargs(json_schema, grammar, regex)
    if structured and (prompt_cache is not None or spec.get("prompt_lookup") or spec.get("draft_model")):
        raise ElmError("--json-schema / --grammar / --regex: not supported with --prompt-cache, "
                       "--prompt-lookup or --draft-model yet")
    spec.update(structured)
    if tok.chat_template is not None:
        typer.echo(f"(chat template {tok.chat_template.origin}; --no-chat-template sends the prompt as it is)",
                   err=True)
        system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        prompt = tok.apply_chat_template(system + [{"role": "user", "content": prompt}])
    context = None
    if prompt_cache is not None:
        from . import prompt_cache as cache_file

        context, ident, _ = cache_file.open_cache(prompt_cache, choice.model, choice.dtype, choice.tokenizer, model, tok,
                                                  compile=not no_compile)
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stream = context.stream(tok, ids, max_tokens, sampling=sampling, ignore_eos=ignore_eos, stop=stops, **spec)
    else:
        stream = stream_generate(model, tok, prompt, max_tokens, sampling=sampling, compile=not no_compile,
                                 ignore_eos=ignore_eos, stop=stops, **spec)
    last, interrupted = None, False
    try:
        for last in stream:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:  # the text so far stays printed; the exit code says it was cut short
        interrupted = True
    finally:
        stream.close()
        if context is not None:
            cache_file.save(prompt_cache, context, ident)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if interrupted:
        typer.echo("(interrupted)", err=True)
    if context is not None:
        typer.echo(f"(prompt cache {prompt_cache}: {context.reused} of {len(ids)} prompt tokens reused, "
                   f"{len(context.ids)} tokens saved)", err=True)
    if last is not None and last.finish_reason == "length" and last.generation_tokens < max_tokens:
        window = model.config.max_context_length
        typer.echo(f"(stopped at OpenELM's {window}-token context after {last.generation_tokens} of the "
                   f"{max_tokens} tokens -m asked for)", err=True)
    if last is not None:
        typer.echo(stats_line(last), err=True)
        say_if_speculation_did_not_pay(model, last)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def say_if_speculation_did_not_pay(model, last) -> None:
    """Speculation that is slower than plain decoding says so once, at the end of the run
    (measured over 16 tokens or more: fewer is noise)."""
    from .speculative import did_not_pay, plain_step_seconds

    if last.acceptance_rate is None or last.generation_tokens < 16:
        return
    notice = did_not_pay(last.generation_tps, plain_step_seconds(model), last.acceptance_rate,
                         last.tokens_per_forward)
    if notice:
        typer.echo(notice, err=True)


@app.command(short_help="Convert checkpoints into an MLX folder.")
@user_errors
def convert(
    src: Annotated[list[str], typer.Argument(
        help="Checkpoint(s): an Apple HF folder, preset or hub id; an elm-mlx, mlx-lm or mlx-community folder "
        "(quantized or not); or a CoreNet .pt file (with --preset or --config). Several only with --average.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to create (must not exist).")],
    dtype: Annotated[DtypeName, typer.Option(
        help="Stored dtype of the float weights (and of quantization scales). The 3B must not use fp16.")] = "bf16",
    quant: Annotated[Optional[Literal["q4", "q8"]], typer.Option(
        help="Quantize (affine, mx.quantize). The embedding / output head and block 0, the most sensitive, get "
        "8 bits under q4 and stay unquantized under q8 (see docs/QUANTIZATION.md). The folder then loads with "
        "no flags.")] = None,
    group_size: Annotated[Optional[Literal["32", "64", "128"]], typer.Option(
        help="With --quant: weights sharing one scale and bias. Default 64.")] = None,
    report: Annotated[bool, typer.Option(
        "--report", help="With --quant: measure mean KL, top-1 agreement and perplexity against the unquantized "
        "model on a fixed text; printed and saved as quality.json.")] = False,
    average: Annotated[bool, typer.Option(
        "--average", help="Average the parameters of several checkpoints of one architecture (the paper averages "
        "the last five), one tensor at a time.")] = False,
    to: Annotated[Literal["elm", "mlx-lm"], typer.Option(
        "--to", help="Layout: elm, or mlx-lm, which adds the tokenizer files mlx_lm.load needs (tokenizer.json, "
        "tokenizer_config.json with the chat template) and the safetensors index.")] = "elm",
    tokenizer: TokenizerOpt = None,
    preset: Annotated[Optional[str], typer.Option(
        help="Size of CoreNet .pt checkpoints: 270M, 450M, 1_1B or 3B.")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="CoreNet training YAML giving the size of .pt checkpoints "
        "(model.language_modeling.general_gpt.model_name).")] = None,
):
    """Convert OpenELM checkpoint(s) into one MLX folder (weights, config, tokenizer)."""
    from .convert import convert as run
    from .hub import locate

    paths, label = [], None
    for s in src:
        path, repo = locate(s, "src", "SRC")
        paths.append(path)
        label = label or repo
    run(paths, output, dtype=dtype, tokenizer=tokenizer, label=label, quant=quant,
        group_size=None if group_size is None else int(group_size), average=average, layout=to, preset=preset,
        config=config, report=report)


@app.command(short_help="Talk with a model in the terminal.")
@user_errors
@speculation_options
@sampling_options(temp=0.7, top_p=0.9, repetition_penalty=1.2)
@model_options
def chat(
    system: Annotated[Optional[str], typer.Option(
        "--system", "--system-prompt", help="System prompt (change it in the chat with /system TEXT).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", min=1,
                                            help="Most tokens per reply; stops earlier at EOS.")] = 512,
    prompt_cache: PromptCacheOpt = None,
    no_compile: NoCompileOpt = False,
    json_schema: Annotated[Optional[str], typer.Option("--json-schema", help="Structured output: every reply is "
                           "an instance of this JSON Schema (a file, or the JSON itself).")] = None,
    *, choice: ModelChoice, sampling, speculation,
):
    """Talk with a model in the terminal: streamed replies, history kept within the
    2048-token context (oldest turns dropped, with a notice) and its KV cache reused.
    Commands: /reset, /system TEXT, /save FILE, /load FILE, /stats, /quit (or Ctrl-D);
    Ctrl-C stops the current reply."""
    from .chat import Chat, repl

    no_cache_with_adapter(prompt_cache, choice)
    model, tok = choice.load()
    spec = speculation.generate_kwargs(model, tok, choice.dtype, choice.tokenizer)
    structured = structured_kwargs(json_schema, None, None)
    if structured and (spec.get("prompt_lookup") or spec.get("draft_model")):
        raise ElmError("--json-schema: not supported with --prompt-lookup or --draft-model yet")
    spec.update(structured)
    template = tok.chat_template
    how = f"chat template {template.origin}" if template else "no chat template: your text is continued as typed"
    chat_ = Chat(model, tok, template, system, max_tokens, sampling, compile=not no_compile, speculation=spec)
    title = f"elm-mlx chat with {choice.model} ({how})."
    if prompt_cache is not None:
        title += "\n" + chat_.keep_in(prompt_cache, choice.model, choice.dtype, choice.tokenizer)
    repl(chat_, title)


@app.command(short_help="Serve an OpenAI-compatible HTTP API.")
@user_errors
@speculation_options
@sampling_options(temp=0.7, top_p=0.9, repetition_penalty=1.2)
@model_options
def serve(
    host: Annotated[str, typer.Option(
        help="Address to listen on; 0.0.0.0 exposes the model to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535,
                                      help="Port to listen on (0 picks a free one and prints it).")] = 8080,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m", min=1,
                                            help="Default max_tokens for requests without one.")] = 512,
    max_batch: Annotated[Optional[int], typer.Option(
        min=1, help="Most requests decoding together (one batched model pass per token); more wait in a queue. "
        "Default: 8 on a CPU, 16 on a GPU.")] = None,
    allowed_origins: Annotated[Optional[list[str]], typer.Option(
        "--allowed-origins", help="A web page origin (https://app.example) allowed to call the API from a browser, "
        "besides local pages and the chat page; repeat for several, '*' for any.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="ELM_MLX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ requests.")] = None,
    log_level: Annotated[Literal["debug", "info", "warning", "error"], typer.Option(
        help="Server log; info has a line per request (tokens, tok/s, finish reason).")] = "info",
    *, choice: ModelChoice, sampling, speculation,
):
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions and
    /v1/completions, streamed or not, with logprobs; GET /v1/models, /health) with a chat page at /.
    The sampling flags are the defaults of requests that leave them out (top_k, min_p and
    repetition_penalty are extensions to OpenAI's API). Concurrent requests decode together in one
    batch (--max-batch), each getting the tokens it would get alone; more wait in a queue.
    Speculative decoding (--prompt-lookup, --draft-model, and the per-request extensions
    prompt_lookup and num_draft_tokens) runs inside the same batch, beside plain requests."""
    from .server import Defaults
    from .server import serve as run

    defaults = Defaults(max_tokens, sampling, speculation.prompt_lookup, speculation.ngram,
                        speculation.num_draft_tokens)
    run(choice.model, host, port, defaults, choice.dtype, choice.tokenizer, choice.chat_template,
        choice.no_chat_template, max_batch=max_batch, log_level=log_level,
        allowed_origins=tuple(allowed_origins or ()), api_key=api_key, draft_model=speculation.draft_model,
        adapter_path=choice.adapter_path)


@app.command(short_help="Measure tok/s, memory and bandwidth.")
@user_errors
@speculation_options
def bench(
    model: ModelOpt,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Build the model's exact architecture with random weights instead of loading "
        "any (speed does not depend on their values): offline, on any machine. --model is then a preset or a "
        "folder with config.json.")] = False,
    method: Annotated[Literal["paper", "pp-tg", "edit"], typer.Option(
        help="paper: the OpenELM paper's Apple-silicon method (BOS + a fixed 36-token English prompt, 1024 "
        "generated tokens, 1 run after a warm-up). pp-tg: llama-bench / mlx_lm.benchmark (a random prompt of "
        "--prompt-tokens 512, 128 generated tokens, 5 runs, mean +- std). edit: a 108-token request to rewrite a "
        "passage with its typos fixed, 80 generated tokens, 3 runs: the workload --prompt-lookup is for.")] = "paper",
    dtype: DtypeOpt = None,
    quant: Annotated[Optional[Literal["q4", "q8", "q4-uniform", "q8-uniform"]], typer.Option(
        help="Quantize the weights first: q4 / q8 as `elm-mlx convert --quant` does (the recipe), or "
        "q4-uniform / q8-uniform (every Linear and the embedding alike, as mlx-lm's convert does); group size "
        "64.")] = None,
    gen_tokens: Annotated[Optional[int], typer.Option(
        "--gen-tokens", "-g", min=1, help="Tokens to generate per run (EOS is ignored).")] = None,
    prompt_tokens: Annotated[Optional[int], typer.Option(
        "--prompt-tokens", "-p", min=1, help="Random prompt length (pp-tg).")] = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", "-n", min=1, help="Measured runs per engine.")] = None,
    compare: Annotated[Optional[Literal["mlx-lm"]], typer.Option(
        help="Also run mlx-lm's own OpenELM on the same weight arrays, prompt and settings, alternating runs, "
        "and print the ratio per metric (needs `pip install \"elm-mlx[mlx-lm]\"`).")] = None,
    json_file: Annotated[Optional[str], typer.Option(
        "--json", help="Write the runs as a JSON list to FILE ('-': stdout, and the table goes to stderr).")] = None,
    no_compile: NoCompileOpt = False,
    *, speculation,
):
    """Measure prompt, generation and total tok/s, time to first token, peak memory and memory bandwidth achieved.
    With --prompt-lookup or --draft-model, speculative decoding runs beside plain decoding (alternating) and
    the table adds its acceptance and speed-up."""
    from .bench import run_bench

    run_bench(model, random_weights=random_weights, method=method, dtype=dtype, quant=quant, gen_tokens=gen_tokens,
              prompt_tokens=prompt_tokens, repeats=repeats, compare=compare, json_file=json_file,
              compile=not no_compile, say=lambda msg: typer.echo(msg, err=True), speculation=speculation)


EVAL_INSTALL = 'elm-mlx eval needs lm-evaluation-harness: pip install "elm-mlx[eval]"'


def import_evaluate():
    """elm_mlx.evaluate, or one line on how to install lm-eval (an optional extra)."""
    try:
        from . import evaluate
    except ImportError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise ElmError(EVAL_INSTALL) from None
    return evaluate


@app.command("eval", short_help="Score a model with lm-evaluation-harness.")
@user_errors
def eval_(
    model: ModelOpt,
    tasks: Annotated[Optional[str], typer.Option(
        help="lm-eval tasks or groups, comma-separated (arc_easy,hellaswag,mmlu; `lm-eval ls tasks` lists them). "
        "Datasets download through lm-eval (Hugging Face datasets) on first use.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        min=0, help="Examples in each prompt. Default: each task's own.")] = None,
    limit: Annotated[Optional[int], typer.Option(
        min=1, help="Score only the first N examples of each task (a quick check; not comparable with published "
        "numbers).")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Write lm-eval's results JSON to FILE ('-': stdout, and the tables go to "
        "stderr).")] = None,
    paper: Annotated[bool, typer.Option(
        "--paper", help="Run the model card's evaluation (0-shot ARC-c/e, BoolQ, HellaSwag, PIQA, RACE, SciQ, "
        "TruthfulQA, WinoGrande; 5-shot MMLU, WinoGrande; 25-shot ARC-c, CrowS-Pairs; 10-shot HellaSwag) and "
        "print each score beside the card's for this model, with the difference.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests scored per forward pass.")] = 8,
    include_path: Annotated[Optional[Path], typer.Option(
        file_okay=False, exists=True, help="A folder of extra lm-eval task YAMLs (your own tasks).")] = None,
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
    adapter_path: AdapterPathOpt = None,
):
    """Score a model with lm-evaluation-harness, the harness OpenELM's model card used
    (BOS prepended, as the card does). Prints lm-eval's tables; --output saves its JSON.
    Needs the eval extra: pip install "elm-mlx[eval]"."""
    evaluate = import_evaluate()
    if paper and (tasks or num_fewshot is not None):
        raise ElmError("--paper runs the model card's tasks and shots: leave out --tasks and --num-fewshot")
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not paper and not names:
        raise ElmError("--tasks: name at least one lm-eval task (e.g. --tasks arc_easy,hellaswag), or use --paper")
    evaluate.run_eval(model, names, num_fewshot=num_fewshot, limit=limit, output=output, paper=paper,
                      batch_size=batch_size, include_path=include_path, dtype=dtype, tokenizer=tokenizer,
                      adapter_path=adapter_path, say=lambda text: typer.echo(text, err=output == "-"))


@app.command(short_help="Perplexity of a text file.")
@user_errors
def perplexity(
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file; BOS is prepended.")],
    model: ModelOpt,
    context: Annotated[int, typer.Option(min=1, help="Tokens each window reads (at most the model's "
                                         "2048).")] = 2048,
    stride: Annotated[Optional[int], typer.Option(
        min=1, help="New tokens scored per window after the first; each reads the --context tokens before it. "
        "Default --context (lm-eval's rolling windows: every token scored once, the fewest passes); smaller "
        "gives every token more context and costs context/stride times the compute.")] = None,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Windows per forward pass (fewer for long windows: the logits per pass are bounded).")] = 8,
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
    adapter_path: AdapterPathOpt = None,
):
    """Perplexity of a text file with sliding windows, to compare dtypes and quantizations
    of one model (the same file, context and stride for each). Prints `perplexity: X` and tokens/s."""
    from .score import perplexity_of_file

    perplexity_of_file(model, file, context=context, stride=stride, batch_size=batch_size, dtype=dtype,
                       tokenizer=tokenizer, adapter_path=adapter_path, say=typer.echo)


@app.command(short_help="List the presets, and what is cached.")
@user_errors
def models(
    rm: Annotated[Optional[list[str]], typer.Option(
        "--rm", help="Remove a model from this machine (a preset or hub id; repeatable): elm-mlx's converted "
        "copies and its Hugging Face download (other tools that share that cache fetch it again).")] = None,
):
    """List the presets (hub id, parameters, layers, memory), then what this machine holds:
    downloads in the Hugging Face cache and elm-mlx's converted copies, with their sizes."""
    from .config import models_table
    from .hub import remove, stored

    if rm:
        for name in rm:
            gone = remove(name)
            for s in gone:
                typer.echo(f"removed {s.model} {s.form}: {s.path} ({gigabytes(s.size)})")
            typer.echo(f"freed {gigabytes(sum(s.size for s in gone))}")
        return
    typer.echo(models_table())
    typer.echo("")
    held = stored()
    if not held:
        typer.echo("Nothing downloaded yet: the first `elm-mlx generate -M 270M ...` downloads and converts a preset.")
        return
    typer.echo(f"On this machine ({gigabytes(sum(s.size for s in held))}; `elm-mlx models --rm NAME` removes one):")
    width = max(len(s.model) for s in held) + 2
    for s in held:
        typer.echo(f"{s.model:<{width}}{s.form:<28}{gigabytes(s.size):>10}  {s.path}")


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- fine-tuning (elm_mlx/tune.py, lora.py, fuse.py)
def _opt(help, *names, **kw):
    return typer.Option(*names, help=help, **kw)


@app.command(short_help="Fine-tune a LoRA or DoRA adapter.")
@user_errors
def lora(
    model: ModelOpt,
    data: Annotated[Path, _opt("A folder with train.jsonl (and valid.jsonl): one JSON object a line, "
                               '{"text"}, {"prompt","completion"} or {"messages"} (as mlx_lm.lora reads).')],
    adapter_path: Annotated[Path, _opt("Folder the adapter is written to (adapter_config.json + "
                                       "adapters.safetensors, mlx-lm's format).", "--adapter-path")] = Path("adapters"),
    preset: Annotated[Optional[Literal["paper"]], _opt(
        "paper: the OpenELM paper's PEFT settings (rank 32, scale 1, dropout 0.1, every layer, qkv/out/proj_1/"
        "proj_2 and the tied embedding, AdamW 0.9/0.95, no weight decay, clip 1, cosine 3e-4 -> 3e-5 with "
        "100 warm-up iterations). Flags given override it.")] = None,
    fine_tune_type: Annotated[Optional[Literal["lora", "dora"]], _opt("lora or dora.", "--fine-tune-type")] = None,
    rank: Annotated[Optional[int], _opt("Adapter rank (default 8).", min=1)] = None,
    scale: Annotated[Optional[float], _opt("Scale of the low-rank update (alpha / rank; default 20).")] = None,
    dropout: Annotated[Optional[float], _opt("Dropout on the adapter's input (default 0).", min=0.0, max=0.99)] = None,
    num_layers: Annotated[Optional[int], _opt("Adapt the last N layers; -1: all (default 16).", "--num-layers")] = None,
    keys: Annotated[Optional[str], _opt("Comma-separated modules to adapt: qkv_proj, out_proj, proj_1, proj_2, "
                                        "token_embeddings (default the first four).")] = None,
    iters: Annotated[Optional[int], _opt("Training iterations (default 1000).", min=1)] = None,
    batch_size: Annotated[Optional[int], _opt("Rows per iteration, over all processes (default 4).",
                                              "--batch-size", min=1)] = None,
    learning_rate: Annotated[Optional[float], _opt("Peak learning rate (default 1e-5).", "--learning-rate")] = None,
    lr_schedule: Annotated[Optional[Literal["constant", "cosine"]], _opt(
        "constant, or cosine decay to --min-learning-rate.", "--lr-schedule")] = None,
    min_learning_rate: Annotated[Optional[float], _opt("End of the cosine (default 0).", "--min-learning-rate")] = None,
    warmup: Annotated[Optional[int], _opt("Linear warm-up iterations (at most a tenth of --iters).", min=0)] = None,
    grad_clip: Annotated[Optional[float], _opt("Clip the gradient's global norm (default: off).", "--grad-clip")] = None,
    seed: Annotated[int, _opt("Seed of the initialization, batch order and dropout.")] = 0,
    mask_prompt: Annotated[bool, _opt("Leave the prompt (all but the last message) out of the loss.",
                                      "--mask-prompt")] = False,
    grad_checkpoint: Annotated[bool, _opt("Recompute activations in the backward pass (less memory).",
                                          "--grad-checkpoint")] = False,
    val_batches: Annotated[int, _opt("Validation batches per evaluation; -1: all of valid.jsonl.",
                                     "--val-batches")] = 25,
    steps_per_report: Annotated[int, _opt("Iterations between loss reports.", "--steps-per-report", min=1)] = 10,
    steps_per_eval: Annotated[int, _opt("Iterations between validation losses.", "--steps-per-eval", min=1)] = 200,
    save_every: Annotated[int, _opt("Iterations between checkpoints (0: only at the end).", "--save-every",
                                    min=0)] = 100,
    max_seq_length: Annotated[Optional[int], _opt("Longest row in tokens (default: the model's context); a longer "
                                                  "row is an error.", "--max-seq-length", min=2)] = None,
    resume: Annotated[bool, _opt("Continue the run saved in --adapter-path (adapter, optimizer state, step).")] = False,
    dtype: DtypeOpt = None,
    tokenizer: TokenizerOpt = None,
):
    """Fine-tune a LoRA or DoRA adapter (QLoRA on a quantized model folder) on JSONL data. Under
    `mlx.launch` it trains data-parallel: each process takes its share of every batch, gradients are
    averaged, only rank 0 writes and reports. Ctrl-C saves the latest adapter."""
    import mlx.core as mx

    from . import load
    from .tune import PRESETS, TrainConfig, load_data, train

    given = dict(fine_tune_type=fine_tune_type, rank=rank, scale=scale, dropout=dropout, num_layers=num_layers,
                 keys=keys.split(",") if keys else None, iters=iters, batch_size=batch_size,
                 learning_rate=learning_rate, lr_schedule=lr_schedule, min_learning_rate=min_learning_rate,
                 warmup=warmup, grad_clip=grad_clip)
    cfg = TrainConfig(**{**PRESETS.get(preset, {}), **{k: v for k, v in given.items() if v is not None}},
                      seed=seed, mask_prompt=mask_prompt, grad_checkpoint=grad_checkpoint, val_batches=val_batches,
                      steps_per_report=steps_per_report, steps_per_eval=steps_per_eval, save_every=save_every)
    if resume and not (adapter_path / "adapter_config.json").exists():
        raise ElmError(f"--resume: {adapter_path} holds no adapter to continue")
    if not resume and (adapter_path / "adapters.safetensors").exists():
        raise ElmError(f"{adapter_path} already holds an adapter: pass --resume to continue it, or another "
                       "--adapter-path")
    group = mx.distributed.init()
    group = group if group.size() > 1 else None
    net, tok = load(model, dtype=dtype, tokenizer=tokenizer)
    limit = net.config.max_context_length
    if max_seq_length is not None and max_seq_length > limit:
        raise ElmError(f"--max-seq-length {max_seq_length}: the model's context is {limit}")
    train_data, valid_data = load_data(data, tok, tok.chat_template, cfg.mask_prompt, max_seq_length or limit)
    h = train(net, train_data, valid_data, cfg, adapter_path, resume=resume, model_name=model, group=group)
    if group is None or group.rank() == 0:
        typer.echo(f"wrote {adapter_path} (iteration {h['step']})", err=True)
    if h["interrupted"]:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(short_help="Fold an adapter into the model's weights.")
@user_errors
def fuse(
    model: ModelOpt,
    adapter_path: Annotated[Path, _opt("The adapter folder to fold in.", "--adapter-path")],
    output: Annotated[Path, _opt("Folder to create (must not exist).", "--output", "-o")],
    dtype: Annotated[DtypeName, _opt("Stored dtype of the float weights.")] = "bf16",
    dequantize: Annotated[bool, _opt("Store a quantized base's fused layers as floats instead of "
                                     "re-quantizing them.")] = False,
    quant: Annotated[Optional[Literal["q4", "q8"]], _opt("Quantize a float base after fusing (convert's recipe).")] = None,
    tokenizer: TokenizerOpt = None,
):
    """Fold an adapter into the model's weights: a plain converted folder, loadable with no adapter."""
    from . import load
    from .fuse import fuse_to_folder
    from .hub import resolve

    folder = resolve(model, "fp32", tokenizer)
    net, tok = load(model, dtype="fp32", tokenizer=tokenizer, adapter_path=adapter_path)
    fuse_to_folder(net, tok, folder, output, dtype=dtype, dequantize=dequantize, quant=quant)
    typer.echo(f"wrote {output}", err=True)


def debug_first(args: list[str]) -> list[str]:
    """--debug is the top-level option, but users add it anywhere: moved to the front (not past a `--`)."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug"] + [a for i, a in enumerate(args) if not (i < end and a == "--debug")]


def main():
    from . import blas

    try:  # typer >= 0.2x parses with its own copy of click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    blas.bind()  # done by the package import already; the entry point states it
    code = 0
    try:
        returned = app(args=debug_first(sys.argv[1:]), prog_name="elm-mlx", standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
    except click.NoArgsIsHelpError as e:  # plain `elm-mlx`: the help
        e.show()
        code = e.exit_code
    except click.UsageError as e:  # README's one line, as for every other mistake
        see = f" (see: {e.ctx.command_path} -h)" if e.ctx is not None else ""
        sys.stderr.write(f"error: {e.format_message()}{see}\n")
        code = 2
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.Abort:
        sys.stderr.write("\ninterrupted\n")
        code = EXIT_INTERRUPTED
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # outside a command (while typer parses)
        sys.stderr.write("\ninterrupted\n")
        code = EXIT_INTERRUPTED
    blas.exit_process(code)  # never through native destructors: they can hang or crash (elm_mlx/blas.py)


def name_metavars(typer_app) -> None:
    """Help shows TEXT / N / X / PATH for option values (typer's own are <str>, <int range>,
    <list[str]>) and a single argument's name in capitals; choices keep their list."""
    import types
    from typing import Union, get_args, get_origin

    from typer.models import ArgumentInfo, OptionInfo

    names = {str: "TEXT", int: "N", float: "X", Path: "PATH"}
    for command in typer_app.registered_commands:
        for param in inspect.signature(command.callback).parameters.values():
            if get_origin(param.annotation) is not Annotated:
                continue
            kind, *extras = get_args(param.annotation)
            info = next((e for e in extras if isinstance(e, (OptionInfo, ArgumentInfo))), None)
            if get_origin(kind) in (Union, types.UnionType):  # Optional[X]
                kind = next(a for a in get_args(kind) if a is not type(None))
            many = get_origin(kind) is list
            kind = get_args(kind)[0] if many else kind
            if info is None or info.metavar is not None or kind not in names:
                continue
            if isinstance(info, OptionInfo):
                info.metavar = names[kind]
            elif not many:  # (a list argument's metavar would print as {SRC}...)
                info.metavar = param.name.upper()


name_metavars(app)
