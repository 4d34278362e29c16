"""chat.py: one-shot --prompt mode, clear errors for bad paths, and a real terminal session."""

from __future__ import annotations

import codecs
import io
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dschat.models.builtin import BUILTIN_MODEL_DIR  # noqa: E402
from inference import chatbot  # noqa: E402

CHAT = str(REPO / "chat.py")
TIMEOUT = 60


def chat_env() -> dict[str, str]:
    """Environment for chat.py subprocesses: no tokenizer thread pools, no hub access."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_chat(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run chat.py to completion with captured output."""
    return subprocess.run([sys.executable, CHAT, *args], capture_output=True, text=True, env=chat_env(),
                          cwd=cwd, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------- subprocesses
def test_prompt_mode_answers_and_exits():
    result = run_chat("--path", BUILTIN_MODEL_DIR, "--prompt", "What fruits are there?", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_missing_path_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = run_chat("--path", missing, "--prompt", "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0]


def test_broken_model_dir_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = run_chat("--path", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


class Terminal:
    """A child process on a pseudo-terminal, read with expect-style waits."""

    def __init__(self, argv: list[str]):
        master, slave = os.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=chat_env(),
                                     cwd=REPO, start_new_session=True)
        os.close(slave)  # the child holds the only copy now, so its exit gives us EOF
        self.fd = master
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.pos = "", 0

    def _read(self, deadline: float) -> bool:
        """Append what the child wrote; False at EOF."""
        ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            raise AssertionError(f"timed out; terminal so far:\n{self.text}")
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: Linux's answer once the child closed its side
            data = b""
        self.text += self.decoder.decode(data)
        return bool(data)

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Wait for `pattern`; returns what came before it since the last match."""
        deadline = time.monotonic() + timeout
        while pattern not in self.text[self.pos:]:
            if not self._read(deadline):
                raise AssertionError(f"EOF before {pattern!r}; terminal:\n{self.text}")
        start = self.text.index(pattern, self.pos)
        before, self.pos = self.text[self.pos:start], start + len(pattern)
        return before

    def send(self, line: str) -> None:
        """Type a line."""
        os.write(self.fd, (line + "\n").encode())

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Read to EOF and return the exit code."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        os.close(self.fd)
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))


def answer_in(segment: str) -> str:
    """The assistant's answer inside the terminal text of one round."""
    assert "Assistant:" in segment, segment
    return segment.split("Assistant:", 1)[1].strip()


def test_interactive_session_in_a_terminal():
    term = Terminal([sys.executable, CHAT, "--path", "builtin", "--max_new_tokens", "8"])
    try:
        term.expect("Human: ")
        term.send("Which fruits are red?")
        first = answer_in(term.expect("Human: "))
        term.send("And which are yellow?")
        answer_in(term.expect("Human: "))
        term.send("clear")
        term.expect("[history cleared]")
        term.expect("Human: ")
        # Greedy decoding: with the history gone, the same question must get the first answer again.
        term.send("Which fruits are red?")
        assert answer_in(term.expect("Human: ")) == first
        term.send("quit")
        assert term.finish() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "Traceback" not in term.text


def test_without_a_trained_actor_says_what_to_pass(tmp_path, monkeypatch):
    # in-process, with the repository root moved to an empty folder: a trained actor in this checkout
    # (output/step3-models/builtin/actor after the README's run) must not hide the message
    monkeypatch.setattr(chatbot, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(chatbot.ChatError, match="no trained model found") as err:
        chatbot.resolve_model_path(None)
    assert "--path" in str(err.value)
    actor = tmp_path / chatbot.DEFAULT_ACTOR
    actor.mkdir(parents=True)
    assert chatbot.resolve_model_path(None) == str(actor)


# -------------------------------------------------------------------------------------------- in-process
def test_dschat_prompt_format_joins_turns():
    conversation = chatbot.Conversation()
    assert conversation.render("Hi?") == "Human: Hi? Assistant:"
    conversation.add("Hi?", "Hello.")
    assert conversation.render("Fruit?") == "Human: Hi? Assistant: Hello. Human: Fruit? Assistant:"
    assert conversation.render("Fruit?", start=1) == "Human: Fruit? Assistant:"


def test_streaming_never_shows_a_new_human_turn():
    generator = chatbot.Generator(model=None, tokenizer=None)
    out, text, shown = io.StringIO(), "", 0
    for chunk in ["apple", ", pear.", " Hu", "man: more"]:
        text += chunk
        shown = generator._show(text, shown, out)
        assert "Hu" not in out.getvalue()
    assert out.getvalue() == "apple, pear."
    assert chatbot.final_answer(" apple, pear. Human: more") == "apple, pear."
    assert chatbot.visible_length("a H") == 1 and chatbot.visible_length("a Ho") == 4


def test_stop_criterion_fires_on_a_new_turn():
    from dschat.models.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    prompt = tokenizer("Human: hi Assistant:", return_tensors="pt")["input_ids"]
    stop = chatbot.make_stop_criterion(tokenizer, prompt.shape[1], "Human:", threading.Event())
    more = tokenizer(" apple.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    turn = tokenizer(" apple. Human:", add_special_tokens=False, return_tensors="pt")["input_ids"]
    import torch

    assert not stop(torch.cat([prompt, more], 1), None).item()
    assert stop(torch.cat([prompt, turn], 1), None).item()


def test_chat_loop_commands(monkeypatch):
    class Recorder:
        """Stands in for Generator: answers with the number of turns it was given."""

        seen: list[int] = []

        def answer(self, conversation, message, out=None):
            self.seen.append(len(conversation.turns))
            return f"turns={len(conversation.turns)}"

    lines = iter(["hello", "", "again", "clear", "after", "exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    out = io.StringIO()
    recorder = Recorder()
    chatbot.chat_loop(recorder, out)
    assert recorder.seen == [0, 1, 0]  # history grew, then `clear` emptied it
    assert "[history cleared]" in out.getvalue()
    assert next(lines) == "never read"  # `exit` ended the session


def test_eof_ends_the_session(monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    chatbot.chat_loop(chatbot.Generator(model=None, tokenizer=None), io.StringIO())


def test_chat_template_is_used_when_the_tokenizer_has_one():
    from dschat.models.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    assert not chatbot.use_chat_template(tokenizer, "auto")
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chatbot.use_chat_template(tokenizer, "auto")
    assert not chatbot.use_chat_template(tokenizer, "dschat")
    conversation = chatbot.Conversation([("Hi?", "Hello.")])
    prompt = conversation.render("Fruit?", chatbot.prompt_format(tokenizer, "auto"))
    assert prompt == "<user>Hi?<assistant>Hello.<user>Fruit?<assistant>"


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
    """The builtin model with a ChatML chat template (as tests/test_prompts.py builds it)."""
    from tests.test_prompts import chatml_copy

    return chatml_copy(tmp_path_factory.mktemp("chatml") / "model")


@pytest.mark.parametrize("kind", ["builtin", "chatml"])
def test_chat_prompt_is_the_training_prompt_for_the_same_messages(kind, chatml_model):
    """chat.py and training render through one PromptFormat: the prompt chat.py sends after a conversation is
    the token sequence step 1 trains the next answer on, and step 3's prompt for the same messages."""
    from dschat.data.phases import tokenize_row
    from dschat.data.prompts import PromptFormat
    from dschat.models.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin" if kind == "builtin" else str(chatml_model), padding_side="left")
    fmt = chatbot.prompt_format(tokenizer, "auto")
    assert fmt.kind == ("dschat" if kind == "builtin" else "chat_template")
    conversation = chatbot.Conversation([("Hi, I am Ann. Name some fruits.", "apple, pear.")], system="Be brief.")
    message = "Summarise: Human: hello Assistant: bye"  # role words inside a message stay its text
    chat_ids = chatbot.encode_prompt(conversation, message, fmt, None)[0].tolist()
    messages = conversation.messages(message)
    row = {"prompt": messages, "chosen": [{"role": "assistant", "content": "kiwi."}], "rejected": None,
           "conversation": True}
    train = tokenize_row(row, PromptFormat.create(tokenizer), 1, 512, 256, False)
    last_answer = fmt.answer_ids({"role": "assistant", "content": "kiwi."})
    assert train["input_ids"] == chat_ids + last_answer
    assert tokenize_row(row, fmt, 3, 512, 256, False)["prompt_ids"] == chat_ids
    text = conversation.render(message, fmt)
    assert message in text and tokenizer.decode(chat_ids) == text
    assert messages[0] == {"role": "system", "content": "Be brief."} and "Be brief." in text
