"""How prompts and answers become token ids: DeepSpeed-Chat's "Human: ... Assistant:" text, or the model's
own chat template. The one renderer of every step, evaluation, rw_eval.py, prompt_eval.py and chat.py.

A prompt is text in DeepSpeed-Chat's form (the builtin data, HH, the registered hub sets) or a list of
{"role", "content"} messages (conversational data, chat.py's history). Messages stay messages until here:
with a chat template they go straight to `apply_chat_template(..., add_generation_prompt=True)` (system
messages and every turn kept, content never parsed); without one they become DeepSpeed-Chat text
(`render_dschat`: "Human: a Assistant: b Human: c Assistant:", a system message's text first). Only a
text prompt meets a chat template through `to_messages`, which reads its "Human:"/"Assistant:" turns (as
before: the ids of text data do not change). Every answer ends with the template's end-of-turn token
(`<|im_end|>` for ChatML models such as SmolLM2; the EOS in the DeepSpeed-Chat format), which is then also
what ends generation and the step-3 action mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dschat.runtime.errors import DatasetError, FlagError

FORMATS = ("auto", "dschat", "chat_template")
TURN = re.compile(r"(?:^|\s)(Human|Assistant):")
Message = dict[str, Any]
Prompt = str | list[Message]


DSCHAT_MARK = "dschat: DeepSpeed-Chat format"  # identifies the template below in a saved tokenizer
_DSCHAT_BODY = (
    "{%- set ns = namespace(sep='') -%}{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- if message['content'] -%}{{ ns.sep + message['content'] }}"
    "{%- set ns.sep = ' ' -%}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}{{ ns.sep + 'Human: ' + message['content'] }}{%- set ns.sep = ' ' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ns.sep + 'Assistant: ' + message['content'] }}"
    "{%- set ns.sep = ' ' -%}"
    "{%- else -%}{{ raise_exception('the DeepSpeed-Chat format knows system, user and assistant messages') }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ ns.sep + 'Assistant:' }}{%- endif -%}")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of text it tokenises (then DeepSpeed-Chat prompts start with it)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def dschat_template(tokenizer) -> str:
    """A chat template that renders exactly `render_dschat`'s text (with the BOS in front where the tokenizer adds
    one when tokenising that text), so a DeepSpeed-Chat-format model's saved tokenizer reproduces its training
    prompts through `apply_chat_template(..., add_generation_prompt=True)`."""
    bos = "{{- bos_token -}}" if adds_bos(tokenizer) else ""
    return "{#- " + DSCHAT_MARK + " (dschat's render_dschat) -#}" + bos + _DSCHAT_BODY


def is_dschat_template(template: str | None) -> bool:
    """Whether a chat template is the DeepSpeed-Chat one this package writes."""
    return bool(template) and DSCHAT_MARK in template


def resolve_format(tokenizer, prompt_format: str) -> str:
    """"dschat" or "chat_template" for --prompt_format (auto: the template when the tokenizer has one; a model
    saved in the DeepSpeed-Chat format carries that format's template and stays "dschat")."""
    if prompt_format not in FORMATS:
        raise FlagError(f"--prompt_format {prompt_format!r}: expected one of {', '.join(FORMATS)}")
    template = getattr(tokenizer, "chat_template", None)
    if is_dschat_template(template):
        return "dschat"
    has_template = bool(template)
    if prompt_format == "chat_template" and not has_template:
        raise FlagError("--prompt_format chat_template: this model's tokenizer has no chat template")
    return "chat_template" if prompt_format == "chat_template" or (prompt_format == "auto" and has_template) \
        else "dschat"


def carry_template(tokenizer, kind: str) -> None:
    """Give `tokenizer` the chat template of the format it trains in, so the model saved with it carries that
    format: in the DeepSpeed-Chat format, the template that renders its text (replacing another template the
    model had when --prompt_format dschat overrode it); a chat-template format keeps the model's own."""
    if kind == "dschat" and not is_dschat_template(getattr(tokenizer, "chat_template", None)):
        tokenizer.chat_template = dschat_template(tokenizer)


def to_messages(prompt: str) -> list[dict[str, str]]:
    """Role messages of a DeepSpeed-Chat text prompt ("Human: a Assistant: b Human: c Assistant:" -> 3 messages);
    used only for text prompts meeting a chat template (message lists are never parsed)."""
    marks = list(TURN.finditer(prompt))
    if not marks:
        return [{"role": "user", "content": prompt.strip()}]
    messages = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(prompt)
        content = prompt[m.end():end].strip()
        role = "user" if m.group(1) == "Human" else "assistant"
        if content or role == "user":
            messages.append({"role": role, "content": content})
    return messages


def render_dschat(messages: list[Message], add_generation_prompt: bool = True) -> str:
    """DeepSpeed-Chat text of a conversation: a system message's text, then "Human: ..." and "Assistant: ..." turns,
    joined by one space; with add_generation_prompt a closing "Assistant:" where the answer begins."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            if m["content"]:
                parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f"Human: {m['content']}")
        elif m["role"] == "assistant":
            parts.append(f"Assistant: {m['content']}")
        else:
            raise DatasetError(f"message role {m['role']!r}: the DeepSpeed-Chat format knows system, user and "
                               f"assistant")
    if add_generation_prompt:
        parts.append("Assistant:")
    return " ".join(parts)


def end_of_turn_id(tokenizer) -> int:
    """The token a chat template closes an assistant turn with (the EOS when it uses none of its own)."""
    probe = "dschat-end-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}],
                                         tokenize=False)
    after = text[text.rfind(probe) + len(probe):] if probe in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id


@dataclass
class PromptFormat:
    """Token ids of prompts and answers for one tokenizer in one format ("dschat" or "chat_template")."""

    tokenizer: object
    kind: str = "dschat"

    def __post_init__(self):
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = end_of_turn_id(self.tokenizer) if self.kind == "chat_template" else \
            self.tokenizer.eos_token_id
        # The text a template writes right after an assistant message's content (None: the format writes none).
        self.turn_end_text = self.tokenizer.decode([self.eos_token_id]) if self.kind == "chat_template" else None

    @classmethod
    def create(cls, tokenizer, prompt_format: str = "auto") -> PromptFormat:
        """The format --prompt_format asks for (auto: the template when there is one)."""
        return cls(tokenizer, resolve_format(tokenizer, prompt_format))

    def render(self, prompt: Prompt) -> str:
        """The prompt text the model reads, ending where the answer begins (a template's generation prompt)."""
        if isinstance(prompt, str):
            if self.kind == "dschat":
                return prompt
            prompt = to_messages(prompt)
        if self.kind == "dschat":
            return render_dschat(prompt)
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of a piece of rendered text inside a sequence (no special tokens added)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (with the model's BOS where its tokenizer adds one, in the dschat format)."""
        if self.kind == "dschat":
            return self.tokenizer(self.render(prompt))["input_ids"]
        return self.text_ids(self.render(prompt))

    def answer_text(self, answer: str | Message) -> str:
        """The text an answer is tokenised from: DeepSpeed-Chat answers keep their leading space (a message's
        content gets one, as "Assistant: <content>" renders it); a template's are stripped."""
        if isinstance(answer, dict):
            return " " + answer["content"] if self.kind == "dschat" else answer["content"].strip()
        return answer if self.kind == "dschat" else answer.strip()

    def answer_ids(self, answer: str | Message | list[Message], end: bool = True) -> list[int]:
        """Token ids of an answer (text, an assistant message, or a one-message list), closed by the end-of-turn
        token (the EOS in the dschat format) unless `end` is False."""
        if isinstance(answer, list):
            if len(answer) != 1:
                raise ValueError("answer_ids takes one message; use encode for a conversation")
            answer = answer[0]
        return self.text_ids(self.answer_text(answer)) + ([self.eos_token_id] if end else [])

    def encode(self, prompt: Prompt, answer: str | list[Message], all_turns: bool = False
               ) -> tuple[list[int], list[bool]]:
        """(token ids, loss mask) of a prompt and its answer, as steps 1 and 2 train on them.

        Text: prompt ids + answer ids, the answer loss-bearing. Messages: the conversation prompt + answer
        rendered turn by turn: the text before each loss-bearing assistant turn (the answer's, and with
        `all_turns` also the prompt's assistant turns) exactly as `render` writes it for that turn, so every
        assistant turn is trained on the prompt chat.py would send for it; the loss covers each such turn's
        content and its end-of-turn token (where the format writes one there; the last turn always has it).
        """
        if isinstance(prompt, str) or isinstance(answer, str):
            p, a = self.prompt_ids(prompt), self.answer_ids(answer)
            return p + a, [False] * len(p) + [True] * len(a)
        messages = list(prompt) + list(answer)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and (all_turns or i >= len(prompt))]
        ids: list[int] = []
        mask: list[bool] = []
        covered = ""  # the rendered text the ids so far stand for
        for k, t in enumerate(turns):
            context = self.render(messages[:t])
            if k == 0:
                piece = self.prompt_ids(messages[:t])
            else:
                if not context.startswith(covered):
                    raise DatasetError("this chat template does not render a conversation's earlier turns as the "
                                       "start of its later prompts, so every assistant turn cannot be trained in "
                                       "one sequence; use --last_turn_only")
                piece = self.text_ids(context[len(covered):])
            ids += piece
            mask += [False] * len(piece)
            if k == len(turns) - 1:
                answer_ids = self.answer_ids(messages[t])
            else:
                after = self.render(messages[:turns[k + 1]])[len(context):]
                written = (" " + messages[t]["content"]) if self.kind == "dschat" else messages[t]["content"]
                if not after.startswith(written):
                    raise DatasetError("this chat template changes an earlier assistant turn's content when it "
                                       "renders later turns; use --last_turn_only")
                closed = bool(self.turn_end_text) and after[len(written):].startswith(self.turn_end_text)
                answer_ids = self.answer_ids(messages[t], end=closed)
                covered = context + written + (self.turn_end_text if closed else "")
            ids += answer_ids
            mask += [True] * len(answer_ids)
        return ids, mask

    def decode(self, ids) -> list[str]:
        """Answer texts of a batch of answer ids (special tokens dropped)."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
