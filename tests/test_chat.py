"""`elm-mlx chat`: the history and its KV cache (checked against fresh forwards and
cache-less generation), the context window, and the REPL driven in a pseudo-terminal."""

import json
import os
import re
import socket
import sys
from contextlib import closing
from pathlib import Path

import mlx.core as mx
import numpy as np
import pexpect
import pytest
from checkpoints import random_weights
from engine import TINY_32K, build

from elm_mlx import ElmError, stream_generate
from elm_mlx.chat import Chat
from elm_mlx.chat_template import OPENELM_TEMPLATE, ChatTemplate, chat_ids, encode_pieces
from elm_mlx.sample import SamplingParams

APPLE = ChatTemplate(OPENELM_TEMPLATE, "OpenELM-Instruct")
GREEDY = SamplingParams(temp=0.0, repetition_penalty=1.2)  # the penalty must see the whole conversation, cached or not


@pytest.fixture(scope="module")
def model(tiny32k_model):
    return tiny32k_model



def say(chat, text):
    chat.add_user(text)
    return [r.token for r in chat.reply()]


def assert_cache_matches_a_fresh_forward(model, chat):
    """The cache holds exactly chat.context.ids: one more token through it gives the logits a
    full forward over those ids gives."""
    ids = chat.context.ids
    assert all(c.offset == len(ids) for c in chat.context.cache)
    probe = 450
    cached = model(mx.array([[probe]]), chat.context.cache)[0, -1]
    fresh = model(mx.array([ids + [probe]]))[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(fresh), rtol=1e-4, atol=1e-4)


def test_replies_equal_generation_without_a_cache(model, tok):
    chat = Chat(model, tok, APPLE, system="Be brief.", max_tokens=12, sampling=GREEDY)
    for text in ["Hello there", "And then?", "Thanks"]:
        chat.add_user(text)
        prompt = chat.prompt_ids()
        replies = list(chat.reply())
        fresh = list(stream_generate(model, tok, prompt, 12, sampling=GREEDY))
        assert [r.token for r in replies] == [r.token for r in fresh]
        assert chat.messages[-1] == {"role": "assistant", "content": "".join(r.text for r in fresh)}
        # The cache holds the prompt it was given and every token of the reply.
        assert chat.context.ids == prompt + [r.token for r in replies]
    assert [m["role"] for m in chat.conversation()] == ["system"] + ["user", "assistant"] * 3
    assert_cache_matches_a_fresh_forward(model, chat)


def test_a_turn_reads_only_what_the_cache_lacks(model, tok):
    chat = Chat(model, tok, APPLE, max_tokens=10, sampling=GREEDY)
    say(chat, "Hello there")
    first_prompt = chat_ids(tok, APPLE, chat.messages[:1])
    say(chat, "Tell me more")
    # The whole first prompt at least (the reply's own tokens may re-tokenize differently).
    assert chat.context.reused >= len(first_prompt)
    assert chat.last.prompt_tokens == len(chat.context.ids) - 10 - chat.context.reused
    assert chat.last.prompt_tokens < len(chat_ids(tok, APPLE, chat.messages[:3]))


def test_the_next_turn_reads_only_the_new_message_as_the_reply_was_generated(model, tok):
    """The reply stays in the history as the model's own ids: turn 2 reads nothing of turn 1 again,
    however the reply's text re-tokenizes."""
    chat = Chat(model, tok, APPLE, max_tokens=12, sampling=GREEDY)
    say(chat, "Hello there")
    turn1 = list(chat.context.ids)
    say(chat, "Tell me more")
    new = chat.context.ids[len(turn1):len(chat.context.ids) - chat.last.generation_tokens]
    assert chat.context.ids[:len(turn1)] == turn1 and chat.context.reused == len(turn1)
    assert chat.last.prompt_tokens == len(new)
    # the new part is what a full encoding gives the text after the reply: "</s>" (the model did
    # not say it: cut at max_tokens), then "\n<|user|>\nTell me more</s>\n<|assistant|>", piece by piece
    assert new == chat_ids(tok, APPLE, chat.messages[:3])[-len(new):] and new[0] == tok.eos_id
    assert_cache_matches_a_fresh_forward(model, chat)


def test_a_reply_the_model_ended_with_eos_is_followed_by_what_comes_after_the_templates_eos(model, tok):
    chat = Chat(model, tok, APPLE, max_tokens=6, sampling=GREEDY)
    say(chat, "Hello there")
    prompt_text, reply, eos, ids = chat.spoken
    assert not eos
    chat.spoken = (prompt_text, reply, True, ids + [tok.eos_id])  # as if the model had said EOS next
    chat.add_user("Tell me more")
    after = encode_pieces(tok, "\n<|user|>\nTell me more</s>\n<|assistant|>\n")
    assert chat.prompt_ids() == ids + [tok.eos_id] + after
    chat.system = "Be brief."  # the history no longer begins as it was read: encoded from text again
    assert chat.prompt_ids() == chat_ids(tok, APPLE, chat.conversation())


def test_a_reply_closed_early_stays_in_the_history(model, tok):
    chat = Chat(model, tok, APPLE, max_tokens=50, sampling=GREEDY)
    chat.add_user("Tell me a long story")
    prompt = chat.prompt_ids()
    with closing(chat.reply()) as stream:  # what Ctrl-C does in the REPL
        got = [next(stream) for _ in range(4)]
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(r.text for r in got)}
    assert chat.context.ids == prompt + [r.token for r in got]
    assert_cache_matches_a_fresh_forward(model, chat)
    say(chat, "Go on")
    assert_cache_matches_a_fresh_forward(model, chat)


def test_reset_and_a_new_system_prompt_reuse_what_still_matches(model, tok):
    chat = Chat(model, tok, APPLE, max_tokens=6, sampling=GREEDY)
    say(chat, "Hello")
    chat.reset()
    assert chat.messages == []
    tokens = say(chat, "Hello")
    assert tokens == [r.token for r in stream_generate(model, tok, chat_ids(tok, APPLE, chat.messages[:1]), 6,
                                                       sampling=GREEDY)]
    chat.system = "You are a pirate."
    say(chat, "Ahoy")
    assert chat.conversation()[0] == {"role": "system", "content": "You are a pirate."}
    assert_cache_matches_a_fresh_forward(model, chat)


@pytest.fixture(scope="module")
def short_model():
    """A 256-token window, so that a few turns fill it."""
    return build(TINY_32K | {"max_context_length": 256}, random_weights(TINY_32K, seed=3))


def test_oldest_turns_are_dropped_to_fit_the_window(short_model, tok):
    model = short_model
    chat = Chat(model, tok, APPLE, max_tokens=8, sampling=GREEDY)
    long = "word " * 70  # ~90 tokens a turn with the template and reply: the third overflows 256 - 8
    dropped = []
    for i in range(5):
        dropped.append(chat.add_user(f"{i} {long}"))
        list(chat.reply())
    assert dropped[:2] == [0, 0] and dropped[2] > 0 and chat.dropped == sum(dropped)
    assert len(chat.prompt_ids()) + 8 <= 256
    users = [m["content"].split()[0] for m in chat.messages if m["role"] == "user"]
    assert users == [str(i) for i in range(5 - len(users), 5)]  # the newest ones, in order
    assert chat.messages[0]["role"] == "user"
    assert_cache_matches_a_fresh_forward(model, chat)


def test_a_message_too_long_for_the_window_is_refused(short_model, tok):
    chat = Chat(short_model, tok, APPLE, max_tokens=8, sampling=GREEDY)
    say(chat, "Hi")
    before = list(chat.messages)
    with pytest.raises(ElmError, match=r"that message \(with the system prompt\) is \d+ tokens; "
                                       r"OpenELM's context is 256"):
        chat.add_user("word " * 260)
    assert chat.messages == before


def test_save_and_load_round_trip(model, tok, tmp_path):
    chat = Chat(model, tok, APPLE, system="Be kind.", max_tokens=5, sampling=GREEDY)
    say(chat, "Hello")
    chat.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved == chat.conversation()
    other = Chat(model, tok, APPLE, max_tokens=5, sampling=GREEDY)
    other.load(tmp_path / "c.json")
    assert other.conversation() == chat.conversation() and other.prompt_ids() == chat.prompt_ids()
    for bad, message in [('{"role": "user"}', "expected a JSON list"), ('[{"role": "robot", "content": "x"}]',
                         "message 0 should be"), ('[{"role": "user", "content": "x"}, {"role": "system", '
                         '"content": "y"}]', "only the first may be"), ("not json", "cannot read")]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ElmError, match=message):
            other.load(tmp_path / "bad.json")


# ---------------------------------------------------------------- the REPL in a pseudo-terminal

@pytest.fixture(scope="module")
def folder(instruct_folder):
    return instruct_folder


def spawn(folder, *args):
    exe = Path(sys.executable).with_name("elm-mlx")
    env = dict(os.environ, TERM="dumb")  # no terminal escape codes from readline
    child = pexpect.spawn(str(exe), ["chat", "-M", str(folder), "--dtype", "fp32", "--seed", "0", *args],
                          env=env, encoding="utf-8", timeout=120, dimensions=(50, 500))
    child.expect_exact(">>> ")
    return child


def command(child, line):
    child.sendline(line)
    child.expect_exact(">>> ")
    return child.before


def test_repl_keeps_history_and_resets(folder, tmp_path):
    child = spawn(folder, "-m", "8")
    command(child, "Hello there")
    command(child, "How are you?")
    stats = command(child, "/stats")
    assert "2 turns in history" in stats and "last reply:" in stats
    command(child, f"/save {tmp_path / 'a.json'}")
    saved = json.loads((tmp_path / "a.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] * 2
    assert [saved[0]["content"], saved[2]["content"]] == ["Hello there", "How are you?"]
    assert "(conversation cleared)" in command(child, "/reset")
    stats = command(child, "/stats")  # the reply before /reset is not "the last reply" of this conversation
    assert "0 turns in history" in stats and "last reply:" not in stats
    command(child, f"/load {tmp_path / 'a.json'}")
    assert "2 turns in history" in command(child, "/stats")
    command(child, "/system Answer in French.")
    assert "Answer in French." in command(child, "/system")
    assert "unknown command /nope" in command(child, "/nope")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_chat(folder, tmp_path):
    child = spawn(folder, "-m", "1900", "--temp", "0")
    child.sendline("Tell me a very long story")
    child.expect_exact("Tell me a very long story")
    child.expect(r"\S")  # the reply has started
    child.sendcontrol("c")
    child.expect_exact("(stopped; the partial reply stays in the history)")
    child.expect_exact(">>> ")
    command(child, f"/save {tmp_path / 'b.json'}")
    reply = json.loads((tmp_path / "b.json").read_text())[1]
    assert reply["role"] == "assistant" and reply["content"]
    generated = int(re.search(r"\| (\d+) tokens, ", command(child, "/stats")).group(1))
    assert 0 < generated < 1900
    child.sendline("Go on")  # the chat goes on after the interrupted reply
    child.expect_exact("Go on")
    child.expect(r"\S")
    child.sendcontrol("c")
    child.expect_exact(">>> ")
    assert "2 turns in history" in command(child, "/stats")
    child.sendcontrol("c")  # at the prompt: a hint, not an exit
    child.expect_exact("(Ctrl-D or /quit to leave)")
    child.sendeof()  # Ctrl-D quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_repl_says_when_turns_are_dropped(short_model, tok):
    from io import StringIO

    from elm_mlx.chat import say as repl_say

    chat, out = Chat(short_model, tok, APPLE, max_tokens=8, sampling=GREEDY), StringIO()
    for i in range(3):
        repl_say(chat, f"{i} " + "word " * 70, out)
    assert out.getvalue().count("(dropped the 1 oldest turn to fit OpenELM's 256-token context)") == 1


def test_chat_and_serve_commands_check_their_flags(folder):
    from typer.testing import CliRunner

    from elm_mlx.cli import app

    runner = CliRunner()
    for command in ["chat", "serve"]:
        assert "Usage" in runner.invoke(app, [command, "-h"]).stdout
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, message in [
            (["chat", "--temp", "-1"], "error: --temp -1.0: expected a number in [0, 2]"),
            (["chat", "-m", "0"], "Invalid value for '--max-tokens' / '-m': Input should be greater than or equal to 1"),
            (["chat", "--chat-template", "t.jinja", "--no-chat-template"], "contradict each other"),
            (["serve", "--port", "70000"], "Invalid value for '--port'"),
            (["serve", "--port", port], f"error: --host 127.0.0.1 --port {port}: cannot listen there"),
            (["serve", "--top-p", "0"], "error: --top-p 0.0: expected a number in (0, 1]"),
        ]:
            r = runner.invoke(app, [args[0], "-M", str(folder), *args[1:]])
            assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_chat_json_schema_makes_every_reply_an_instance(folder, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    child = spawn(folder, "-m", "60", "--temp", "0", "--json-schema", str(tmp_path / "s.json"))
    for line in ["Hello there", "Again please"]:
        reply = command(child, line).split(line, 1)[1].strip()
        jsonschema.validate(json.loads(reply), schema)  # random weights: only the constraint makes it JSON
    child.sendline("/quit")
    child.expect(pexpect.EOF)
