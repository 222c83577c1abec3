"""Training files checked line by line before anything reaches a trainer. Every line in
OpenAI's chat format, `{"messages": [{"role": ..., "content": ...}, ...]}` (roles `system`,
`user`, `assistant`, at least one user message, the assistant's answer last: what a LoRA
adapter learns), or every line a classification example, adapterserve's extension
`{"input": "...", "label": "..."}` (at least two labels: a head adapter learns them).
Every refusal names the line of the file and the reason.

The format is checked when the file is uploaded (a malformed file is refused, 400); the
lengths when a job names it, against the base's context with its tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adapterserve.registry.limits import MAX_LABEL_CHARS

ROLES = {"system", "user", "assistant"}
MIN_EXAMPLES = 10  # OpenAI's minimum for a training file
MAX_LINE_BYTES = 1024 * 1024  # one example; a longer line is refused before it is parsed


class DatasetInvalid(ValueError):
    def __init__(self, line: int | None, reason: str):
        super().__init__(f"line {line}: {reason}" if line else reason)
        self.line = line
        self.reason = reason


@dataclass
class Dataset:
    kind: str  # "chat" (a LoRA adapter learns the answers) or "classification" (a head adapter)
    examples: list  # chat: each example's messages; classification: (input, label)
    lines: list[int]  # the line of the file each example is on

    @property
    def count(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[str]:
        """A classification file's label names, sorted (the head's label order)."""
        return sorted({label for _, label in self.examples}) if self.kind == "classification" else []


def read_chat_file(path: Path, min_examples: int = MIN_EXAMPLES) -> Dataset:
    """The examples of a training file, or DatasetInvalid naming the first bad line: every
    line in the chat format, or every line a classification example (adapterserve's
    extension: `{"input": "...", "label": "..."}`, at least two labels)."""
    examples, lines, kind = [], [], None
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetInvalid(number, f"the line is longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise DatasetInvalid(number, "not a JSON object (the file must be JSONL: one JSON object per line)") from None
            this = "classification" if isinstance(record, dict) and "input" in record and "messages" not in record else "chat"
            if kind is not None and this != kind:
                raise DatasetInvalid(number, f"a {this} example in a file of {kind} examples")
            kind = this
            examples.append(_messages(record, number) if kind == "chat" else _labelled(record, number))
            lines.append(number)
    if len(examples) < min_examples:
        raise DatasetInvalid(None, f"the file holds {len(examples)} examples; at least {min_examples} are needed")
    dataset = Dataset(kind or "chat", examples, lines)
    if dataset.kind == "classification" and len(dataset.labels) < 2:
        raise DatasetInvalid(None, "a classification file needs at least two labels")
    return dataset


def _labelled(record: dict, number: int) -> tuple[str, str]:
    text, label = record.get("input"), record.get("label")
    if not isinstance(text, str) or not text:
        raise DatasetInvalid(number, "'input' must be non-empty text")
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS:
        raise DatasetInvalid(number, f"'label' must be a name of 1 to {MAX_LABEL_CHARS} characters")
    return text, label


def _messages(record: object, number: int) -> list[dict]:
    if not isinstance(record, dict) or "messages" not in record:
        raise DatasetInvalid(number, "no 'messages' (each line is {\"messages\": [{\"role\": ..., \"content\": ...}, ...]})")
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DatasetInvalid(number, "'messages' must be a list of at least two messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetInvalid(number, f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetInvalid(number, f"message {index} has role {str(role)[:40]!r}; roles are system, user, assistant")
        if not isinstance(content, str) or not content:
            raise DatasetInvalid(number, f"message {index} has no text 'content'")
    if not any(m["role"] == "user" for m in messages):
        raise DatasetInvalid(number, "no user message")
    if messages[-1]["role"] != "assistant":
        raise DatasetInvalid(number, "the last message must be the assistant's answer (what is learned)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_lengths(dataset: Dataset, tokenizer, max_tokens: int) -> int:
    """The tokens the examples hold (as the base's chat template renders them); an example
    over `max_tokens` is refused with its number."""
    total = 0
    for line, example in zip(dataset.lines, dataset.examples):
        if dataset.kind == "chat":
            ids = tokenizer.apply_chat_template(example, tokenize=True)
        else:
            ids = tokenizer(example[0])["input_ids"]
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if len(ids) > max_tokens:
            raise DatasetInvalid(line, f"the example is {len(ids)} tokens, over the context of {max_tokens}")
        total += len(ids)
    return total
