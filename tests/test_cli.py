import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import make_hf_checkpoint
from engine import TINY_32K
from typer.testing import CliRunner

from elm_mlx import generate, load
from elm_mlx.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny32k")
    make_hf_checkpoint(path, TINY_32K, seed=5)
    return path


@pytest.fixture(scope="module")
def with_tokenizer(folder, tmp_path_factory, llama_tokenizer):
    path = tmp_path_factory.mktemp("tiny32k_tok")
    shutil.copytree(folder, path, dirs_exist_ok=True)
    shutil.copyfile(llama_tokenizer, path / "tokenizer.model")
    return path


def test_generate_streams_text_to_stdout_and_stats_to_stderr(with_tokenizer):
    r = runner.invoke(app, ["generate", "--model", str(with_tokenizer), "Once upon a time", "-m", "12",
                            "--dtype", "fp32"])
    assert r.exit_code == 0, r.stderr
    model, tok = load(with_tokenizer, dtype="fp32")
    assert r.stdout == generate(model, tok, "Once upon a time", 12) + "\n"
    assert "prompt: 5 tokens" in r.stderr and "generation: 12 tokens" in r.stderr and "peak memory" in r.stderr


def test_generate_ignore_eos_reaches_the_loop_and_refuses_a_format(with_tokenizer):
    # (stream_generate's own test shows EOS is passed over; here: the flag is wired, and refused
    # with structured output, which ends at EOS.)
    base = ["generate", "-M", str(with_tokenizer), "Once upon a time", "-m", "12", "--dtype", "fp32", "--ignore-eos"]
    r = runner.invoke(app, base)
    assert r.exit_code == 0, r.stderr
    assert "generation: 12 tokens" in r.stderr
    r = runner.invoke(app, base + ["--regex", "[ab]+"])
    assert r.exit_code == 2 and "drop --ignore-eos" in r.stderr


def test_generate_takes_mlx_lm_style_prompt_and_stop_flags(with_tokenizer):
    base = ["generate", "-M", str(with_tokenizer), "-m", "16", "--dtype", "fp32"]
    positional = runner.invoke(app, base + ["Once upon a time"])
    option = runner.invoke(app, base + ["--prompt", "Once upon a time"])
    assert positional.exit_code == option.exit_code == 0, option.stderr
    assert option.stdout == positional.stdout
    text = positional.stdout[:-1]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = runner.invoke(app, base + ["-p", "Once upon a time", "--stop", stop, "--stop", "\\nnever"])
    assert cut.exit_code == 0, cut.stderr
    assert cut.stdout == text[: text.find(stop)] + "\n" and "generation: 16 tokens" not in cut.stderr
    for argv, message in [(base, "give the prompt once"), (base + ["a", "-p", "b"], "given twice"),
                          (base + ["a", "--system-prompt", "Be brief."], "--system-prompt: ")]:
        r = runner.invoke(app, argv)
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_system_prompt_goes_before_the_message_in_the_chat_template(with_tokenizer, tmp_path):
    from elm_mlx.chat_template import ChatTemplate

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    args = ["generate", "-M", str(with_tokenizer), "-m", "6", "--dtype", "fp32", "--chat-template", str(template)]
    r = runner.invoke(app, args + ["--system-prompt", "Be brief.", "Hi"])
    assert r.exit_code == 0, r.stderr
    model, tok = load(with_tokenizer, dtype="fp32")
    tok.chat_template = ChatTemplate(template.read_text(), str(template))
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == "<system>Be brief.<user>Hi<assistant>"
    assert r.stdout == generate(model, tok, ids, 6) + "\n"


def test_stop_escapes():
    from elm_mlx.cli import unescape

    assert unescape("a\\nb\\tc\\\\n") == "a\nb\tc\\n" and unescape("plain") == "plain"


def test_no_compile_decodes_the_same_text_with_the_eager_forward(with_tokenizer, monkeypatch):
    args = ["generate", "-M", str(with_tokenizer), "Once upon a time", "-m", "16", "--temp", "0.8", "--top-p", "0.9",
            "--seed", "3", "--repetition-penalty", "1.2"]
    compiled = runner.invoke(app, args)
    assert compiled.exit_code == 0, compiled.stderr

    def no_compiled_step(*a, **k):
        raise AssertionError("--no-compile used the compiled step")

    monkeypatch.setattr(sys.modules["elm_mlx.generate"], "decode_step", no_compiled_step)
    eager = runner.invoke(app, args + ["--no-compile"])
    assert eager.exit_code == 0, eager.stderr
    assert eager.stdout == compiled.stdout and "generation: 16 tokens" in eager.stderr


# serve decodes through the batch engine's packed eager forward (elm_mlx/batch.py), never the compiled step
@pytest.mark.parametrize("command", ["generate", "chat", "bench"])
def test_every_decoding_command_takes_no_compile(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "--no-compile" in r.stdout


def test_tokenizer_flag_serves_a_folder_without_one(folder, llama_tokenizer):
    r = runner.invoke(app, ["generate", "-M", str(folder), "Hi", "-m", "3", "--tokenizer",
                            str(llama_tokenizer), "--temp", "0.8", "--top-p", "0.9", "--seed", "1",
                            "--repetition-penalty", "1.2"])
    assert r.exit_code == 0, r.stderr
    assert "generation: 3 tokens" in r.stderr


def test_generate_says_once_when_the_context_cut_it_short(with_tokenizer, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(with_tokenizer, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_context_length": 12}))
    r = runner.invoke(app, ["generate", "-M", str(small), "Once upon a time", "-m", "50", "--dtype", "fp32"])
    assert r.exit_code == 0, r.stderr
    assert "generation: 7 tokens" in r.stderr  # 5 prompt tokens + 7 = the 12-token context
    assert r.stderr.count("context") == 1 and "stopped at OpenELM's 12-token context after 7 of the 50" in r.stderr
    r = runner.invoke(app, ["generate", "-M", str(small), "Once upon a time", "-m", "3", "--dtype", "fp32"])
    assert r.exit_code == 0 and "context" not in r.stderr


def test_prompt_from_stdin(with_tokenizer):
    r = runner.invoke(app, ["generate", "-M", str(with_tokenizer), "-", "-m", "2"], input="Hello there")
    assert r.exit_code == 0 and "prompt: 3 tokens" in r.stderr


def test_stdin_loses_one_trailing_newline_and_continues_as_the_argument_does(with_tokenizer):
    args = ["generate", "-M", str(with_tokenizer), "-m", "4"]
    as_argument = runner.invoke(app, [*args, "Hello there"])
    piped = runner.invoke(app, [*args, "-"], input="Hello there\n")
    assert piped.exit_code == 0 and as_argument.exit_code == 0, piped.stderr
    assert piped.stdout == as_argument.stdout and "prompt: 3 tokens" in piped.stderr
    two = runner.invoke(app, [*args, "-"], input="Hello there\n\n")  # only one is echo's
    assert "prompt: 3 tokens" not in two.stderr
    assert "trailing newline" in " ".join(runner.invoke(app, ["generate", "-h"]).stdout.split())


@pytest.mark.parametrize("args,message", [
    (["--model", "no/such/dir/x"], "error: --model no/such/dir/x: expected an existing file or folder"),
    (["--model", "1.1b-instuct"], "did you mean 1_1B-Instruct?"),
    (["--dtype", "int4"], "Invalid value for '--dtype': Value error, 'int4' is not one of 'bf16', 'fp16', 'fp32'"),
    (["--temp", "-1"], "error: --temp -1.0: expected a number in [0, 2]"),
    (["--seed", "-1"], "error: --seed -1: expected an integer from 0 to"),
    (["--seed", str(2**64)], f"error: --seed {2**64}: expected an integer from 0 to"),
    (["--tokenizer", "/nonexistent/tokenizer.model"], "/nonexistent/tokenizer.model"),
])
def test_bad_flags_say_what_is_wrong_without_a_traceback(with_tokenizer, args, message):
    argv = ["generate", "-M", str(with_tokenizer), "x"] + args
    if args[0] == "--model":
        argv = ["generate", "x"] + args
    r = runner.invoke(app, argv)
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("command", ["generate", "convert", "models"])
def test_every_command_has_short_help(command):
    r = runner.invoke(app, [command, "-h"])
    assert r.exit_code == 0 and "Usage" in r.stdout


def test_models_lists_presets_with_exact_parameters():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0
    for line in ["270M-Instruct", "apple/OpenELM-3B", "271,527,168", "1,079,891,456", "3,036,647,424"]:
        assert line in r.stdout


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("elm-mlx")  # where pip puts this interpreter's scripts
    assert exe.exists(), f"{exe} missing: install the package (pip install -e .)"
    out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout and "convert" in out.stdout


def test_version():
    from elm_mlx import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"elm-mlx {__version__}"


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "convert"])
def test_help_at_80_columns_shows_every_flag_whole(command):
    """Every option the command declares appears in full in -h at 80 columns, with no
    negated twin of a flag that is already a negation (`--no-no-chat-template`)."""
    import click
    import typer.main

    r = runner.invoke(app, [command, "-h"], env={"COLUMNS": "80"}, terminal_width=80)
    assert r.exit_code == 0 and "--no-no-" not in r.stdout and "…" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    cmd = typer.main.get_command(app).commands[command]
    for param in cmd.params:
        if isinstance(param, click.Option):
            for flag in param.opts:
                assert flag in r.stdout, flag


def test_top_level_help_at_80_columns_cuts_no_command_description():
    r = runner.invoke(app, ["-h"], env={"COLUMNS": "80"}, terminal_width=80)
    listed = r.stdout.split("Commands:")[1].strip().splitlines()
    assert r.exit_code == 0 and len(listed) == len(typer_command().commands)
    assert all(not line.rstrip().endswith(("...", "\u2026")) for line in listed), listed


def typer_command():
    import typer.main

    return typer.main.get_command(app)


@pytest.mark.parametrize("command", sorted(typer_command().commands))
def test_option_values_are_named_as_click_names_them(command):
    """TEXT, N, X, PATH (or the choices), not typer's <str>, <int range>, <list[str]>."""
    r = runner.invoke(app, [command, "-h"], env={"COLUMNS": "100"}, terminal_width=100)
    options = r.stdout.split("Options:")[1]
    assert r.exit_code == 0
    for typed in ["<str>", "<int", "<float", "<path>", "<list["]:
        assert typed not in options, (command, typed)


@pytest.mark.parametrize("args, needle", [
    (["generate", "--bogus", "x"], "No such option: --bogus"),
    (["generate"], "Missing option '--model'"),
    (["bogus"], "No such command 'bogus'"),
    (["generate", "-m", "-3", "hi"], "Invalid value for '--max-tokens'"),
])
def test_usage_errors_are_one_error_line_exit_2(args, needle):
    from hostile import ELM_MLX, quiet_env

    r = subprocess.run([ELM_MLX, *args], capture_output=True, text=True, env=quiet_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_debug_works_after_the_subcommand_too(tmp_path):
    from hostile import ELM_MLX, quiet_env

    r = subprocess.run([ELM_MLX, "generate", "--model", str(tmp_path / "none"), "hi", "--debug"], capture_output=True,
                       text=True, env=quiet_env(), timeout=120)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.strip().endswith("there is none at that path")


def test_a_draft_folder_without_a_tokenizer_speaks_the_models(with_tokenizer, folder, offline_caches):
    """No --tokenizer needed for a draft that has none (it must use the model's anyway), and
    --tokenizer given for it is not reported as unused."""
    args = ["generate", "-M", str(with_tokenizer), "Once upon a time", "-m", "8", "--dtype", "fp32"]
    plain = runner.invoke(app, args)
    r = runner.invoke(app, args + ["--draft-model", str(folder)])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == plain.stdout and "speculative:" in r.stderr
    r = runner.invoke(app, args + ["--draft-model", str(folder), "--tokenizer", str(with_tokenizer / "tokenizer.model")])
    assert r.exit_code == 0 and "not --tokenizer" not in r.stderr, r.stderr


def test_an_uncached_draft_preset_names_draft_model(with_tokenizer, offline_caches):
    r = runner.invoke(app, ["generate", "-M", str(with_tokenizer), "hi", "-m", "4", "--draft-model", "270M"])
    assert r.exit_code == 2 and "--draft-model" in r.stderr and "--model" not in r.stderr.replace("--draft-model", ""), \
        r.stderr


@pytest.mark.parametrize("step_seconds, said", [(1e-6, True), (10.0, False)])
def test_speculation_that_cannot_pay_says_so_once(with_tokenizer, monkeypatch, step_seconds, said):
    import elm_mlx.speculative as spec

    monkeypatch.setattr(spec, "plain_step_seconds", lambda model: step_seconds)  # plain decoding's cost, measured
    r = runner.invoke(app, ["generate", "-M", str(with_tokenizer), "Once upon a time", "-m", "20", "--dtype", "fp32",
                            "--ignore-eos", "--prompt-lookup", "4"])
    assert r.exit_code == 0, r.stderr
    assert r.stderr.count("did not pay") == (1 if said else 0), r.stderr


def test_the_speculation_notice_states_the_measured_numbers():
    from elm_mlx.speculative import did_not_pay

    notice = did_not_pay(10.0, 0.05, 0.2, 1.1)  # 10 tok/s where one plain step takes 50 ms: 0.5x at most
    assert "20% of guesses kept" in notice and "1.10 tokens per forward" in notice and "0.50x" in notice
    assert did_not_pay(30.0, 0.05, 0.9, 2.5) is None  # 1.5x the plain bound: it may have paid
