"""How prompts and answers become token ids: DeepSpeed-Chat's "Human: ... Assistant:" text, or the model's
own chat template.

Every source's prompt is stored in DeepSpeed-Chat's form (`data/sources.py`). With a chat template the
prompt is parsed back into role messages (each "Human:" turn a user message, each "Assistant:" turn an
assistant message; HH dialogues become alternating turns), rendered with `apply_chat_template(...,
add_generation_prompt=True)`, and every answer ends with the template's end-of-turn token (`<|im_end|>`
for ChatML models such as SmolLM2), which is then also what ends generation and the step-3 action mask.
All steps, evaluation and chat.py go through this one class, so a model is trained in the format it is
later spoken to in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dschat.runtime.errors import FlagError

FORMATS = ("auto", "dschat", "chat_template")
TURN = re.compile(r"(?:^|\s)(Human|Assistant):")


def resolve_format(tokenizer, prompt_format: str) -> str:
    """"dschat" or "chat_template" for --prompt_format (auto: the template when the tokenizer has one)."""
    if prompt_format not in FORMATS:
        raise FlagError(f"--prompt_format {prompt_format!r}: expected one of {', '.join(FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat_template" and not has_template:
        raise FlagError("--prompt_format chat_template: this model's tokenizer has no chat template")
    return "chat_template" if prompt_format == "chat_template" or (prompt_format == "auto" and has_template) \
        else "dschat"


def to_messages(prompt: str) -> list[dict[str, str]]:
    """Role messages of a DeepSpeed-Chat prompt ("Human: a Assistant: b Human: c Assistant:" -> 3 messages)."""
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

    @classmethod
    def create(cls, tokenizer, prompt_format: str = "auto") -> PromptFormat:
        """The format --prompt_format asks for (auto: the template when there is one)."""
        return cls(tokenizer, resolve_format(tokenizer, prompt_format))

    def render(self, prompt: str) -> str:
        """The prompt text the model reads (the chat template's rendering, with the generation prompt)."""
        if self.kind == "dschat":
            return prompt
        return self.tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt (with the model's BOS where its tokenizer adds one, in the dschat format)."""
        if self.kind == "dschat":
            return self.tokenizer(prompt)["input_ids"]
        return self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer, closed by the end-of-turn token (the EOS in the dschat format)."""
        text = answer if self.kind == "dschat" else answer.strip()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_id]

    def decode(self, ids) -> list[str]:
        """Answer texts of a batch of answer ids (special tokens dropped)."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)
