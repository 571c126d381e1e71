"""Training data: read Alpaca/ShareGPT JSONL, render prompts, tokenize with loss on response tokens only.

Importing this module loads nothing heavy: `read_examples` runs before torch so a bad dataset fails fast.
Tokenizing takes any Hugging Face tokenizer object.

Alpaca lines are {"instruction", "input", "output"} rendered as Venom's prompt:
    ### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n{output}<eos>
ShareGPT lines are {"conversations": [{"from": "system|human|gpt", "value": ...}]} rendered with the
tokenizer's chat template; the loss covers the assistant ("gpt") turns.

Rendering (`render`): "chat" (the default everywhere) trains what serves: every example, Alpaca ones
included, becomes chat messages (`as_chat`: instruction -> system, input -> user; an instruction alone
-> user) rendered by the base model's own chat template, the way llama.cpp/Ollama/Venom ask. "plain" keeps
the file's own form (Alpaca's `### Instruction:` prompt). The Alpaca/ShareGPT files are Venom's exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
RENDERS = ("chat", "plain")
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """The dataset cannot be used; the message names the file, the line and what to fix."""


def read_examples(path: str | Path, fmt: str, *, what: str = "dataset") -> list[dict[str, Any]]:
    """Read and check every line of a JSONL file in `fmt`; raise DataError on the first bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; build it first (academyd curator) or fix the path")
    examples: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{what} {p} line {lineno} is not valid JSON: {exc.msg}") from None
            problem = _check(ex, fmt)
            if problem:
                raise DataError(f"{what} {p} line {lineno}: {problem}")
            examples.append(ex)
    if not examples:
        raise DataError(f"{what} {p} has no examples; a training run needs at least one line")
    return examples


def _check(ex: Any, fmt: str) -> str | None:
    if not isinstance(ex, dict):
        return "each line must be a JSON object"
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                return f'alpaca lines need a non-empty string "{key}"'
        if not isinstance(ex.get("input", ""), str):
            return 'alpaca "input" must be a string'
        return None
    conv = ex.get("conversations")
    if not isinstance(conv, list) or not conv:
        return 'sharegpt lines need a non-empty "conversations" list'
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return 'each turn needs "from" (system|human|gpt) and a string "value"'
    if not any(ROLES[t["from"]] == "assistant" for t in conv):
        return 'a conversation needs at least one "gpt" turn to learn from'
    return None


def alpaca_prompt(ex: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) in Venom's `### Instruction:` format."""
    prompt = f"### Instruction:\n{ex['instruction']}\n\n"
    if ex.get("input", "").strip():
        prompt += f"### Input:\n{ex['input']}\n\n"
    return prompt + "### Response:\n", ex["output"]


def as_chat(ex: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The example as a ShareGPT conversation (unchanged when it is one)."""
    if fmt == "sharegpt":
        return ex
    instruction, given = str(ex["instruction"]), str(ex.get("input", "")).strip()
    turns = [{"from": "system", "value": instruction}, {"from": "human", "value": given}] if given else [
        {"from": "human", "value": instruction}]
    return {"conversations": [*turns, {"from": "gpt", "value": str(ex["output"])}]}


def rendered(examples: list[dict[str, Any]], fmt: str, render: str) -> tuple[list[dict[str, Any]], str]:
    """(examples, format) as they are tokenized: chat rendering turns everything into ShareGPT."""
    if render == "chat" and fmt != "sharegpt":
        return [as_chat(ex, fmt) for ex in examples], "sharegpt"
    return examples, fmt


def chat_messages(ex: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The request of an example as chat messages (everything before the first reply): what is asked."""
    msgs = sharegpt_messages(as_chat(ex, fmt))
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:first]


def sharegpt_messages(ex: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in ex["conversations"]]


def segments(ex: dict[str, Any], fmt: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """The example as text pieces, each flagged trainable (response) or not (prompt)."""
    if fmt == "alpaca":
        prompt, response = alpaca_prompt(ex)
        return [(prompt, False), (response, True)]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template; use the alpaca format for this model")
    msgs = sharegpt_messages(ex)
    out: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        # The text before the reply includes the template's "assistant header"; the reply is what follows.
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not before.startswith(done) or not through.startswith(before):
            raise DataError("the chat template does not render conversations as growing prefixes; "
                            "use the alpaca format for this model")
        out.append((before[len(done):], False))
        out.append((through[len(before):], True))
        done = through
    return out


def encode(ex: dict[str, Any], fmt: str, tokenizer: Any, max_length: int) -> dict[str, list[int]] | None:
    """input_ids and labels (-100 on prompt tokens), cut to max_length; None if no response token fits.

    A reply's labels end with its end of turn: the tokenizer's eos (Alpaca: appended; chat: the template's,
    when the eos is the template's turn end, as for a GGUF base: academyd.trainer.base)."""
    ids: list[int] = []
    labels: list[int] = []
    pieces = segments(ex, fmt, tokenizer)
    for n, (text, trainable) in enumerate(pieces):
        # Alpaca: the tokenizer's BOS goes first and EOS ends the reply; chat templates carry their own.
        add_special = fmt == "alpaca" and n == 0
        piece = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if fmt == "alpaca" and trainable and tokenizer.eos_token_id is not None:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        keep = len(piece) if trainable else 0
        if trainable and fmt == "sharegpt" and tokenizer.eos_token_id in piece:
            # A reply is learnt through its end of turn (the eos a runtime stops on); what the template puts
            # after it (ChatML's "\n") is never generated: input, not a label.
            keep = len(piece) - piece[::-1].index(tokenizer.eos_token_id)
        labels += piece[:keep] + [IGNORE_INDEX] * (len(piece) - keep)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def prompt_ids(ex: dict[str, Any], fmt: str, tokenizer: Any) -> list[int]:
    """Token ids of the prompt only (what a model is asked), for probes and generation."""
    pieces = segments(ex, fmt, tokenizer)
    return tokenizer(pieces[0][0], add_special_tokens=fmt == "alpaca")["input_ids"]
