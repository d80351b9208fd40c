"""The `elm-mlx` command."""

import sys
from functools import wraps
from pathlib import Path
from typing import Optional

import typer

from .errors import ElmError

app = typer.Typer(
    help="Run Apple's OpenELM language models on MLX.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = ("A model folder (Apple's HF layout or `elm-mlx convert` output), a preset "
              "(270M, 450M, 1_1B, 3B, each also -Instruct; see `elm-mlx models`) or a hub id "
              "(apple/OpenELM-3B). Presets and hub ids are downloaded once into the Hugging Face "
              "cache and converted once.")
DTYPE_HELP = "Compute dtype: bf16, fp16 or fp32. Default: bf16 (as stored for converted folders)."
TOKENIZER_HELP = ("Llama-2 tokenizer.model to use when the model folder has none "
                  "(Apple's repos ship none); otherwise an ungated hub copy is fetched and checked.")
TEMPLATE_HELP = ("A Jinja chat template (transformers' chat_template.jinja format) to use instead of the "
                 "model's. -Instruct models get Apple's zephyr-style template without it.")
NO_TEMPLATE_HELP = "Use no chat template: the text goes to the model as typed (base models never have one)."


def user_errors(fn):
    """Print ElmError as one line and exit 2, instead of a traceback."""
    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ElmError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    return run


@app.command()
@user_errors
def generate(
    prompt: str = typer.Argument(..., help="Text to continue ('-' reads standard input). BOS is prepended."),
    model: str = typer.Option(..., "--model", "-M", help=MODEL_HELP),
    max_tokens: int = typer.Option(256, "--max-tokens", "-m", help="Most tokens to generate; stops earlier at EOS."),
    temp: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(1.0, help="Keep the smallest set of tokens with this much probability; 1 is off."),
    min_p: float = typer.Option(0.0, help="Drop tokens less likely than min-p x the top one; 0 is off."),
    repetition_penalty: float = typer.Option(
        1.0, help="Penalize every token already in the context (transformers' semantics); "
        "Apple suggests 1.2 for OpenELM. 1 is off."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP),
    chat_template: Optional[Path] = typer.Option(None, help=TEMPLATE_HELP),
    no_chat_template: bool = typer.Option(False, help=NO_TEMPLATE_HELP),
):
    """Continue a prompt, streaming the text to stdout and the speed to stderr.
    An -Instruct model gets the prompt as a user message in its chat template."""
    from . import stream_generate
    from .chat_template import chat_ids

    if prompt == "-":
        prompt = sys.stdin.read()
    model_, tok, template = load_chat(model, dtype, tokenizer, chat_template, no_chat_template)
    if template is not None:
        typer.echo(f"(chat template {template.origin}; --no-chat-template sends the prompt as it is)", err=True)
        prompt = chat_ids(tok, template, [{"role": "user", "content": prompt}])
    last = None
    try:
        for last in stream_generate(model_, tok, prompt, max_tokens, temp=temp, top_k=top_k, top_p=top_p,
                                    min_p=min_p, repetition_penalty=repetition_penalty, seed=seed):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write("\n")
    if last is not None:
        typer.echo(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory_gb:.2f} GB", err=True)


@app.command()
@user_errors
def convert(
    src: list[str] = typer.Argument(
        ..., help="Checkpoint(s): an Apple HF folder, preset or hub id; an elm-mlx, mlx-lm or mlx-community "
        "folder (quantized or not); or a CoreNet .pt file (with --preset or --config). Several only with --average."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to create (must not exist)."),
    dtype: str = typer.Option("bf16", help="Stored dtype of the float weights (and of quantization scales): "
                              "bf16, fp16 or fp32. The 3B must not use fp16."),
    quant: Optional[str] = typer.Option(
        None, help="Quantize: q4 or q8 (affine, mx.quantize). The embedding / output head and block 0, the most "
        "sensitive, get 8 bits under q4 and stay unquantized under q8 (see docs/QUANTIZATION.md). The folder "
        "then loads with no flags."),
    group_size: Optional[int] = typer.Option(
        None, help="With --quant: weights sharing one scale and bias, 32, 64 or 128. Default 64."),
    report: bool = typer.Option(
        False, help="With --quant: measure mean KL, top-1 agreement and perplexity against the unquantized model "
        "on a fixed text; printed and saved as quality.json."),
    average: bool = typer.Option(
        False, help="Average the parameters of several checkpoints of one architecture (the paper averages the last "
        "five), one tensor at a time."),
    to: str = typer.Option("elm", "--to", help="Layout: elm (default), or mlx-lm, which adds the tokenizer files "
                           "mlx_lm.load needs (tokenizer.json, tokenizer_config.json) and the safetensors index."),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP),
    preset: Optional[str] = typer.Option(None, help="Size of CoreNet .pt checkpoints: 270M, 450M, 1_1B or 3B."),
    config: Optional[Path] = typer.Option(None, "--config", help="CoreNet training YAML giving the size of .pt "
                                          "checkpoints (model.language_modeling.general_gpt.model_name)."),
):
    """Convert OpenELM checkpoint(s) into one MLX folder (weights, config, tokenizer)."""
    from .checkpoint import parse_dtype
    from .convert import convert as run
    from .hub import download, repo_id

    parse_dtype(dtype)  # before a download of up to 12 GB
    paths, label = [], None
    for s in src:
        path = Path(s).expanduser()
        if not path.exists():
            repo = repo_id(s)
            if repo is None:
                raise ElmError(f"SRC {s!r} is not a folder, a .pt file, a preset or a hub id (org/name)")
            path, label = download(repo), label or repo
        paths.append(path)
    run(paths, output, dtype=dtype, tokenizer=tokenizer, label=label, quant=quant, group_size=group_size,
        average=average, layout=to, preset=preset, config=config, report=report)


def load_chat(model, dtype, tokenizer, chat_template, no_chat_template):
    """(model, tokenizer, chat template or None) for the chat, serve and generate commands."""
    from . import load
    from .chat_template import choose_template
    from .hub import resolve

    folder = resolve(model, dtype, tokenizer)
    template = choose_template(folder, model, chat_template, no_chat_template)  # before the slow part
    return *load(folder, dtype=dtype, tokenizer=tokenizer), template


@app.command()
@user_errors
def chat(
    model: str = typer.Option(..., "--model", "-M", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, help="System prompt (change it in the chat with /system TEXT)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", help="Most tokens per reply; stops earlier at EOS."),
    temp: float = typer.Option(0.7, help="Sampling temperature; 0 is greedy."),
    top_k: int = typer.Option(0, help="Keep the k most likely tokens; 0 is off."),
    top_p: float = typer.Option(0.9, help="Keep the smallest set of tokens with this much probability; 1 is off."),
    min_p: float = typer.Option(0.0, help="Drop tokens less likely than min-p x the top one; 0 is off."),
    repetition_penalty: float = typer.Option(
        1.2, help="Penalize every token already in the conversation (transformers' semantics; Apple suggests "
        "1.2). 1 is off."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP),
    chat_template: Optional[Path] = typer.Option(None, help=TEMPLATE_HELP),
    no_chat_template: bool = typer.Option(False, help=NO_TEMPLATE_HELP),
):
    """Talk with a model in the terminal: streamed replies, history kept within the
    2048-token context (oldest turns dropped, with a notice) and its KV cache reused.
    Commands: /reset, /system TEXT, /save FILE, /load FILE, /stats, /quit (or Ctrl-D);
    Ctrl-C stops the current reply."""
    from .chat import Chat, repl
    from .sample import check_sampling

    check_sampling(temp, top_k, top_p, min_p, repetition_penalty)
    if max_tokens < 1:
        raise ElmError(f"--max-tokens {max_tokens}: expected >= 1")
    model_, tok, template = load_chat(model, dtype, tokenizer, chat_template, no_chat_template)
    how = f"chat template {template.origin}" if template else "no chat template: your text is continued as typed"
    repl(Chat(model_, tok, template, system, max_tokens, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
              repetition_penalty=repetition_penalty, seed=seed), f"elm-mlx chat with {model} ({how}).")


@app.command()
@user_errors
def serve(
    model: str = typer.Option(..., "--model", "-M", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 exposes the model to your network."),
    port: int = typer.Option(8080, help="Port to listen on (0 picks a free one and prints it)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-m", help="Default max_tokens for requests without one."),
    temp: float = typer.Option(0.7, help="Default temperature for requests without one."),
    top_k: int = typer.Option(0, help="Default top_k (an extension to OpenAI's API); 0 is off."),
    top_p: float = typer.Option(0.9, help="Default top_p for requests without one; 1 is off."),
    min_p: float = typer.Option(0.0, help="Default min_p (an extension to OpenAI's API); 0 is off."),
    repetition_penalty: float = typer.Option(
        1.2, help="Default repetition_penalty (an extension to OpenAI's API; Apple suggests 1.2). 1 is off."),
    max_batch: Optional[int] = typer.Option(
        None, help="Most requests decoding together (one batched model pass per token); more wait in a queue. "
        "Default: 8 on a CPU, 16 on a GPU."),
    allowed_origins: list[str] = typer.Option(
        [], "--allowed-origins", help="A web page origin (e.g. https://app.example) allowed to call the API from a "
        "browser, besides local pages and the chat page; repeat for several, '*' for any."),
    api_key: Optional[str] = typer.Option(
        None, envvar="ELM_MLX_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/ requests "
        "(env ELM_MLX_API_KEY)."),
    log_level: str = typer.Option("info", help="Server log: debug, info (a line per request: tokens, tok/s, "
                                  "finish reason), warning or error."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    tokenizer: Optional[Path] = typer.Option(None, help=TOKENIZER_HELP),
    chat_template: Optional[Path] = typer.Option(None, help=TEMPLATE_HELP),
    no_chat_template: bool = typer.Option(False, help=NO_TEMPLATE_HELP),
):
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions and
    /v1/completions, streamed or not, with logprobs; GET /v1/models, /health) with a chat page at /.
    Concurrent requests decode together in one batch (--max-batch); each gets the tokens it would
    get alone."""
    from .sample import check_sampling
    from .server import Defaults
    from .server import serve as run

    check_sampling(temp, top_k, top_p, min_p, repetition_penalty)
    if max_tokens < 1:
        raise ElmError(f"--max-tokens {max_tokens}: expected >= 1")
    if not 0 <= port <= 65535:
        raise ElmError(f"--port {port}: expected 0 to 65535")
    if max_batch is not None and max_batch < 1:
        raise ElmError(f"--max-batch {max_batch}: expected >= 1")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ElmError(f"--log-level {log_level!r}: expected debug, info, warning or error")
    run(model, host, port, Defaults(max_tokens, temp, top_p, top_k, min_p, repetition_penalty), dtype, tokenizer,
        chat_template, no_chat_template, max_batch=max_batch, log_level=log_level,
        allowed_origins=tuple(allowed_origins), api_key=api_key)


@app.command()
@user_errors
def bench(
    model: str = typer.Option(..., "--model", "-M", help=MODEL_HELP),
    random_weights: bool = typer.Option(
        False, help="Build the model's exact architecture with random weights instead of loading any (speed does "
        "not depend on their values): offline, on any machine. --model is then a preset or a folder with config.json."),
    method: str = typer.Option(
        "paper", help="paper: the OpenELM paper's Apple-silicon method (BOS + a fixed 36-token English prompt, "
        "1024 generated tokens, 1 run after a warm-up). pp-tg: llama-bench / mlx_lm.benchmark (a random prompt of "
        "--prompt-tokens 512, 128 generated tokens, 5 runs, mean ± std)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    quant: Optional[str] = typer.Option(None, help="Quantize the weights first: q8 or q4 (mlx-lm's affine scheme, "
                                        "group size 64, every Linear and the embedding)."),
    gen_tokens: Optional[int] = typer.Option(None, "--gen-tokens", "-g",
                                             help="Tokens to generate per run (EOS is ignored)."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", "-p", help="Random prompt length (pp-tg)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", "-n", help="Measured runs per engine."),
    compare: Optional[str] = typer.Option(
        None, help="mlx-lm: also run mlx-lm's own OpenELM on the same weight arrays, prompt and settings, "
        "alternating runs, and print the ratio per metric."),
    json_file: Optional[str] = typer.Option(None, "--json", help="Write the runs as a JSON list to FILE ('-': "
                                            "stdout, and the table goes to stderr)."),
):
    """Measure prompt, generation and total tok/s, time to first token, peak memory and memory bandwidth achieved."""
    import json

    import mlx.core as mx

    from . import bench as b

    defaults = b.METHODS.get(method)
    if defaults is None:
        raise ElmError(f"--method {method!r}: expected one of {', '.join(b.METHODS)}")
    if compare not in (None, "mlx-lm"):
        raise ElmError(f"--compare {compare!r}: expected mlx-lm")
    gen_tokens = defaults["gen_tokens"] if gen_tokens is None else gen_tokens
    repeats = defaults["repeats"] if repeats is None else repeats
    if method == "pp-tg" and prompt_tokens is None:
        prompt_tokens = defaults["prompt_tokens"]
    for flag, value in [("--gen-tokens", gen_tokens), ("--repeats", repeats), ("--prompt-tokens", prompt_tokens)]:
        if value is not None and value < 1:
            raise ElmError(f"{flag} {value}: expected >= 1")
    if quant is not None and quant not in b.QUANT_BITS:
        raise ElmError(f"--quant {quant!r}: expected one of {', '.join(b.QUANT_BITS)}")
    say = lambda msg: typer.echo(msg, err=True)  # noqa: E731
    say(f"loading {model}{' (random weights)' if random_weights else ''} ...")
    model_, load_s = b.load_bench_model(model, dtype, random_weights, quant)
    ids = b.prompt_ids(method, prompt_tokens, model_.config.vocab_size)
    if len(ids) + gen_tokens > model_.config.max_context_length:
        raise ElmError(f"{len(ids)} prompt + {gen_tokens} generated tokens exceed OpenELM's "
                       f"{model_.config.max_context_length}-token context")
    say("probing memory bandwidth ...")
    info = {"model": model, "dtype": b.DTYPE_LABELS[model_.transformer.norm.weight.dtype],
            "quant": b.quant_label(model_), "method": method, "load_s": load_s, **b.environment()}
    engines = [b.elm_engine(model_)] + ([b.mlx_lm_engine(model_)] if compare else [])
    runs = b.measure(engines, ids, gen_tokens, repeats, info, progress=say)
    typer.echo(b.table(runs), err=json_file == "-")
    if json_file:
        text = json.dumps(runs, indent=1)
        if json_file == "-":
            typer.echo(text)
        else:
            Path(json_file).write_text(text + "\n")
    mx.clear_cache()


@app.command()
def models():
    """List the presets: hub id, parameters, layers and memory."""
    from .config import PRESETS, OpenELMConfig

    typer.echo(f"{'preset':<15}{'hub id':<30}{'parameters':>15}{'layers':>8}{'bf16 GB':>9}{'KV@2048 MiB':>13}")
    for name in PRESETS:
        cfg = OpenELMConfig.from_preset(name)
        n = cfg.num_parameters()
        kv = cfg.kv_bytes_per_token() * cfg.max_context_length / 2**20
        typer.echo(f"{name:<15}{'apple/OpenELM-' + name:<30}{n:>15,}{cfg.num_transformer_layers:>8}"
                   f"{n * 2 / 1e9:>9.2f}{kv:>13.1f}")


def main():
    app()
