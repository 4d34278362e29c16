"""Interactive chat with a trained actor (or any causal LM): streamed answers, history, `clear`/`quit`.

The conversation is a list of messages rendered by `dschat.data.prompts.PromptFormat`, the renderer training
used: the tokenizer's chat template when it has one (see --prompt_format), else DeepSpeed-Chat's format,
"Human: <question> Assistant:", with earlier turns joined in front of the new one. So the prompt for a
conversation is exactly the prompt a model was trained on for the same messages.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dschat.runtime.errors import ModelPathError

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where e2e_rlhf.py puts the final actor (relative to where it was run, normally the repo root).
DEFAULT_ACTOR = Path("output") / "step3-models" / "builtin" / "actor"  # where e2e_rlhf.py puts it
STOP_MARKER = "Human:"
CLEAR_WORDS = ("clear",)
QUIT_WORDS = ("quit", "exit")
DTYPES = ("fp32", "bf16", "fp16")


class ChatError(Exception):
    """A problem the user can fix (bad path, bad flag): reported as one `error:` line, exit code 2."""


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of chat.py."""
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="Chat with a trained actor. Type 'clear' to reset the history, 'quit' or 'exit' to leave.")
    parser.add_argument("--path", default=None,
                        help=f"model directory, .gguf file or 'builtin' (default: {DEFAULT_ACTOR} when it exists)")
    parser.add_argument("--system", default=None,
                        help="a system message in front of the conversation (rendered as in training)")
    parser.add_argument("--prompt", default=None,
                        help="answer this one prompt, print the answer and exit (no interactive session)")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 disables top-k filtering")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16/fp16 are meant for cuda")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--prompt_format", choices=("auto", "dschat", "chat_template"), default="auto",
                        help="auto: the tokenizer's chat template when it has one, else 'Human: ... Assistant:'")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Decoding flags in their valid ranges (a ChatError naming the flag)."""
    if args.max_new_tokens < 1:
        raise ChatError(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ChatError(f"--temperature must be a finite number > 0 (got {args.temperature}); without --do_sample "
                        f"decoding is greedy and ignores it")
    if not 0 < args.top_p <= 1:
        raise ChatError(f"--top_p must be in (0, 1] (got {args.top_p})")
    if args.top_k < 0:
        raise ChatError(f"--top_k must be 0 (off) or positive (got {args.top_k})")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ChatError(f"--seed must be in [0, 2**32 - 1] (got {args.seed})")


def resolve_model_path(path: str | None) -> str:
    """The model to load: --path as given (~ expanded), or the e2e pipeline's final actor when it exists."""
    if path is not None:
        return str(Path(path).expanduser()) if path.startswith("~") else path
    for base in (Path.cwd(), REPO_ROOT):
        if (base / DEFAULT_ACTOR).is_dir():
            return str(base / DEFAULT_ACTOR)
    raise ChatError(f"no trained model found at {DEFAULT_ACTOR} (run e2e_rlhf.py first); "
                    "pass --path <model dir or .gguf file>, or --path builtin for the untrained demo model")


def pick_device(name: str) -> str:
    """`auto` becomes cuda when a GPU is visible, else cpu; an explicit cuda without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except (RuntimeError, ValueError) as err:
        raise ChatError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ChatError(f"--device {name} asked for, but no CUDA GPU is available")
    if kind == "cuda" and torch.device(name).index is not None and torch.device(name).index >= torch.cuda.device_count():
        raise ChatError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if kind not in ("cpu", "cuda") and not (kind == "mps" and torch.backends.mps.is_available()):
        raise ChatError(f"--device {name}: only cpu and cuda devices (and mps where available) are supported")
    return name


def pick_dtype(name: str, device: str):
    """The torch dtype for --dtype; fp16 is refused on CPU, where many kernels lack half precision."""
    import torch

    if name == "fp16" and not device.startswith("cuda"):
        raise ChatError("--dtype fp16 needs a CUDA device; use fp32 (or bf16) on cpu")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception message on one line, shortened (HF errors can span many lines)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ loading
def load_chat_model(path: str, device: str, dtype, trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer) for a model directory, .gguf file or 'builtin'."""
    from transformers import AutoModelForCausalLM

    from dschat.models.builtin import resolve_model_name
    from dschat.models.loading import load_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, padding_side="left")
        model = load_model(AutoModelForCausalLM, path, tokenizer=tokenizer, dtype=dtype,
                           trust_remote_code=trust_remote_code)
    except Exception as err:  # a corrupt file can raise anything; the user needs one line
        if isinstance(err, ModelPathError) and "not installed" in str(err):
            raise ChatError(one_line(err)) from err
        if not os.path.exists(resolve_model_name(path)):
            raise ChatError(f"model path not found: {path} (not a local directory or .gguf file, "
                            "nor a model in the local Hugging Face cache)") from err
        raise ChatError(one_line(err) if isinstance(err, ModelPathError)
                        else f"cannot load a model from {path}: {one_line(err)}") from err
    return model.to(device).eval(), tokenizer


# ------------------------------------------------------------------------------------------------ prompts
@dataclass
class Conversation:
    """The turns so far (user message, answer), rendered through the training renderer (PromptFormat)."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None  # a system message in front of every prompt (kept by `clear`)

    def clear(self) -> None:
        """Forget all turns."""
        self.turns.clear()

    def add(self, user: str, answer: str) -> None:
        """Record a finished turn."""
        self.turns.append((user, answer))

    def messages(self, message: str, start: int = 0) -> list[dict[str, str]]:
        """The conversation after turns[start:] and the new user `message`, as role messages."""
        out: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        for user, answer in self.turns[start:]:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": message}]

    def render(self, message: str, fmt=None, start: int = 0) -> str:
        """The prompt text for `message` after turns[start:], ending where the model's answer begins (`fmt`: a
        PromptFormat; None: DeepSpeed-Chat's text)."""
        from dschat.data.prompts import render_dschat

        messages = self.messages(message, start)
        return render_dschat(messages) if fmt is None else fmt.render(messages)


def prompt_format(tokenizer, name: str):
    """The PromptFormat for --prompt_format (auto: the tokenizer's chat template when it has one)."""
    from dschat.data.prompts import PromptFormat
    from dschat.runtime.errors import FlagError

    try:
        return PromptFormat.create(tokenizer, name)
    except FlagError as err:
        raise ChatError(str(err)) from err


def use_chat_template(tokenizer, prompt_format_name: str) -> bool:
    """Whether prompts go through the tokenizer's chat template."""
    return prompt_format(tokenizer, prompt_format_name).kind == "chat_template"


def context_limit(model, tokenizer) -> int | None:
    """The longest sequence the model takes, when its config or tokenizer says."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limit = tokenizer.model_max_length  # unset tokenizers report a huge sentinel value
    return limit


def encode_prompt(conversation: Conversation, message: str, fmt, budget: int | None):
    """Token ids (1 x n tensor) of the prompt as training tokenised it (PromptFormat.prompt_ids), dropping the
    oldest turns (then tokens) to fit `budget`."""
    import torch

    for start in range(len(conversation.turns) + 1):
        ids = torch.tensor([fmt.prompt_ids(conversation.messages(message, start))])
        if budget is None or ids.shape[1] <= budget:
            return ids
    return ids[:, -budget:]  # a single message longer than the context: keep its end, next to the answer


# --------------------------------------------------------------------------------------------- generation
def visible_length(text: str, marker: str | None = STOP_MARKER) -> int:
    """How much of a partial answer is safe to show: never a started "Human:" turn nor trailing spaces."""
    if marker:
        cut = text.find(marker)
        if cut >= 0:
            return len(text[:cut].rstrip())
        # The end may be the first letters of the marker; hold them back until the next chunk decides.
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                return len(text[:-k].rstrip())
    return len(text.rstrip())


def final_answer(text: str, marker: str | None = STOP_MARKER) -> str:
    """The answer without surrounding spaces and without a new "Human:" turn the model started."""
    if marker and marker in text:
        text = text[:text.index(marker)]
    return text.strip()


def make_stop_criterion(tokenizer, prompt_len: int, marker: str | None, cancel: threading.Event):
    """A StoppingCriteria ending generation once the answer contains `marker` or `cancel` is set."""
    import torch
    from transformers import StoppingCriteria

    class StopOnMarker(StoppingCriteria):
        """Stops when the decoded answer starts a new turn, or the user pressed Ctrl-C."""

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            if cancel.is_set():
                stop = True
            elif marker:
                stop = marker in tokenizer.decode(input_ids[0, prompt_len:], skip_special_tokens=True)
            else:
                stop = False
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StopOnMarker()


@dataclass
class Generator:
    """Holds the model, tokenizer and decoding settings; answers one prompt at a time."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    fmt: Any = None  # the PromptFormat (None: DeepSpeed-Chat text, built from the tokenizer when needed)

    def __post_init__(self):
        from dschat.data.prompts import PromptFormat

        if self.fmt is None and self.tokenizer is not None:
            self.fmt = PromptFormat(self.tokenizer, "dschat")

    @property
    def marker(self) -> str | None:
        """The text that ends an answer: DeepSpeed-Chat models go on with "Human:"; templates end their turn."""
        return None if self.fmt is not None and self.fmt.kind == "chat_template" else STOP_MARKER

    def generate_kwargs(self) -> dict[str, Any]:
        """Decoding settings for `model.generate`."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "pad_token_id": self.fmt.pad_token_id, "eos_token_id": self.fmt.eos_token_id}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            # Unset the model's own sampling defaults so greedy decoding does not warn about them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def answer(self, conversation: Conversation, message: str, out: TextIO | None = None) -> str:
        """Generate the answer to `message` after the conversation, streaming it to `out` when given."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        limit = context_limit(self.model, self.tokenizer)
        budget = None if limit is None else max(limit - self.max_new_tokens, 1)
        ids = encode_prompt(conversation, message, self.fmt, budget)
        ids = ids.to(self.model.device)
        cancel = threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = make_stop_criterion(self.tokenizer, ids.shape[1], self.marker, cancel)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), streamer=streamer,
                                    stopping_criteria=StoppingCriteriaList([stop]), **self.generate_kwargs())
            except BaseException as err:  # re-raised in the caller's thread below
                failure.append(err)
                streamer.end()  # unblock the reader, which would otherwise wait forever

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, shown = "", 0
        try:
            for chunk in streamer:
                # Leading spaces are dropped: the caller prints "Assistant: " itself.
                text = (text + chunk).lstrip()
                shown = self._show(text, shown, out)
        except KeyboardInterrupt:
            cancel.set()  # Ctrl-C cuts this answer short but keeps the session
            if out is not None:
                out.write(" [interrupted]" if shown else "[interrupted]")
        thread.join()
        if failure and not cancel.is_set():
            raise failure[0]
        answer = final_answer(text, self.marker)
        self._show(answer, shown, out)
        return answer

    def _show(self, text: str, shown: int, out: TextIO | None) -> int:
        """Write the newly safe part of the answer to `out`; returns how much is shown now."""
        safe = visible_length(text, self.marker)
        if out is not None and safe > shown:
            out.write(text[shown:safe])
            out.flush()
        return max(safe, shown)


# ------------------------------------------------------------------------------------------------ session
def read_message(prompt: str = "Human: ") -> str | None:
    """The user's next line, or None at end of input (Ctrl-D) or Ctrl-C; bytes that are not UTF-8 are a ChatError."""
    try:
        line = input(prompt)
        line.encode("utf-8")  # a C locale reads undecodable bytes as surrogates (errors="surrogateescape")
        return line
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    except (UnicodeDecodeError, UnicodeEncodeError) as err:
        print()
        bad = err.object[err.start:err.start + 4]
        if isinstance(bad, str):
            bad = bad.encode("utf-8", "surrogateescape")
        raise ChatError(f"standard input is not utf-8 text ({err.reason}: {bad!r}); chat.py reads UTF-8: set "
                        f"the terminal's encoding or convert the file (e.g. iconv -t utf-8)") from err


def chat_loop(generator: Generator, out: TextIO = sys.stdout, system: str | None = None) -> None:
    """The interactive session: read, answer with streaming, remember; `clear` and `quit` are commands."""
    if sys.stdin.isatty():
        import readline  # noqa: F401 - gives input() line editing and arrow-key recall on a terminal
    conversation = Conversation(system=system)
    while True:
        message = read_message()
        if message is None:
            return
        message = message.strip()
        if not message:
            continue
        if message.lower() in QUIT_WORDS:
            return
        if message.lower() in CLEAR_WORDS:
            conversation.clear()
            out.write("[history cleared]\n")
            out.flush()
            continue
        out.write("Assistant: ")
        out.flush()
        answer = generator.answer(conversation, message, out)
        out.write("\n")
        out.flush()
        conversation.add(message, answer)


def build_generator(args: argparse.Namespace) -> tuple[Generator, str, str]:
    """Load the model named by the arguments; returns (generator, model path, device)."""
    path = resolve_model_path(args.path)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model, tokenizer = load_chat_model(path, device, dtype, args.trust_remote_code)
    generator = Generator(model, tokenizer, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          fmt=prompt_format(tokenizer, args.prompt_format))
    return generator, path, device


def main(argv: list[str] | None = None) -> int:
    """Run chat.py; returns the exit code (0 fine, 2 for a bad path or flag)."""
    try:
        args = parse_args(argv)
    except ChatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Models come from local paths (or the local HF cache): never wait on network retries for a typo.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prompt is not None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep script output clean
    try:
        generator, path, device = build_generator(args)
    except ChatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    if args.prompt is not None:
        print(generator.answer(Conversation(system=args.system), args.prompt))
        return 0
    print(f"Chatting with {path} on {device} ({args.dtype}). "
          "Type 'clear' to reset the history, 'quit' or 'exit' (or Ctrl-D) to leave.")
    try:
        chat_loop(generator, system=args.system)
    except ChatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
