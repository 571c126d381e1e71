"""One example in a neutral shape, and its two renderings (Alpaca, ShareGPT) as Venom writes them.

An example is a system/instruction text plus alternating human/gpt turns ending with gpt. Alpaca folds
earlier turns into `input`; ShareGPT keeps them as turns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# What Venom sends as its chat's system prompt (curator.system_prompt): lessons are trained as the chat
# exchange Venom will have, the question as the user's turn and the answer as the assistant's.
VENOM_SYSTEM_PROMPT = "You are Venom, a helpful local AI assistant."
# The instruction lessons were rendered with before they became chat exchanges (kept for old datasets).
LESSON_INSTRUCTION = (
    "You are Venom's assistant. Given the situation below, say what action to take, what result it had "
    "and the lesson learned."
)
COMMIT_INSTRUCTION = "Write a clear, concise git commit message that describes the following change (a diff)."
TASK_INSTRUCTION = "You are Venom, a helpful local AI assistant. Complete the user's request."

SOURCES = ("lesson", "commit", "task", "approved")
# json.dumps with any option builds a new encoder per call; one shared (stateless) encoder writes the
# same text for the curator's 100k lines without that cost
ENCODER = json.JSONEncoder(ensure_ascii=False)


@dataclass
class Example:
    """A candidate example, keyed by its source record (`lesson:<id>`, `commit:<repo>:<sha>`, `task:<id>`)."""

    source: str
    key: str
    order: tuple[str, str, int]  # (received_at, source, seq): stable as the store grows
    instruction: str
    turns: list[tuple[str, str]]  # ("human"|"gpt", text), alternating, ending with gpt
    required: dict[str, str | None] = field(default_factory=dict)  # fields checked for triviality
    family: str | None = None  # examples that teach the same thing (a lesson's restatements) share one
    answer_key: Any = None  # what a right answer must contain, when the record says (metadata.answer_key)

    def prompt(self) -> str:
        """What is asked (the human turns): what the held-out split and decontamination compare."""
        return "\n".join(t for r, t in self.turns if r == "human")

    def answer(self) -> str:
        return self.turns[-1][1]

    def texts(self) -> list[str]:
        return [self.instruction, *(t for _, t in self.turns)]

    def content(self) -> str:
        """The variable part (what duplicates are judged on): the turns, not the fixed instruction."""
        return "\n".join(t for _, t in self.turns)

    def alpaca(self) -> dict[str, str]:
        earlier, last_human, answer = self.turns[:-2], self.turns[-2][1], self.turns[-1][1]
        if earlier:
            history = "\n".join(f"{'User' if r == 'human' else 'Assistant'}: {t}" for r, t in earlier)
            last_human = f"Earlier conversation:\n{history}\n\nRequest:\n{last_human}"
        return {"instruction": self.instruction, "input": last_human, "output": answer}

    def sharegpt(self) -> dict[str, list[dict[str, str]]]:
        convo = [{"from": "system", "value": self.instruction}]
        convo += [{"from": r, "value": t} for r, t in self.turns]
        return {"conversations": convo}

    def render(self, fmt: str) -> dict[str, Any]:
        return self.alpaca() if fmt == "alpaca" else self.sharegpt()

    def line(self, fmt: str) -> str:
        return ENCODER.encode(self.render(fmt))


def lesson_answer(action: str, feedback: str | None) -> str:
    """What Venom should say when asked the lesson's question: the action, then the lesson learned, with no
    result marker (a "Result: sukces ✅" inside an answer teaches the model to say it to users)."""
    parts = [action.strip()]
    if feedback and feedback.strip() and feedback.strip() != action.strip():
        parts.append(feedback.strip())
    return "\n\n".join(parts)


def lesson_output(action: str, result: str, feedback: str | None) -> str:
    """Venom's own mapping (its instruction format): the action, then the result and the lesson learned."""
    parts = [action.strip(), f"Result: {result.strip()}"]
    if feedback and feedback.strip():
        parts.append(f"Lesson learned: {feedback.strip()}")
    return "\n\n".join(parts)


_HUMAN_ROLES = {"user", "human", "client", "request"}
_GPT_ROLES = {"assistant", "gpt", "ai", "model", "bot", "venom", "response"}


def _history_entries(context_history: Any, task_id: str | None) -> list[Any]:
    """The turns a `context_history` holds. Venom's is a dict: its `session_history_full` (else
    `session_history`) lists {role, content, request_id, ...}; this task's own turns (request_id = the
    task) are left out, the request and the result come from the task itself. A plain list is turns."""
    if isinstance(context_history, list):
        return context_history
    if not isinstance(context_history, dict):
        return []
    turns = context_history.get("session_history_full") or context_history.get("session_history") or []
    if not isinstance(turns, list):
        return []
    if task_id is None:
        return turns
    return [t for t in turns if not (isinstance(t, dict) and str(t.get("request_id")) == task_id)]


def history_turns(context_history: Any, task_id: str | None = None) -> list[tuple[str, str]]:
    """Earlier turns from Venom's `context_history` (its dict, or a list of role/content or from/value entries).

    Unknown roles and empty texts are skipped; consecutive turns of one role are merged so that the
    conversation alternates (chat templates require it); a leading assistant turn is dropped. The
    result may end with a human turn; the caller joins it with the request.
    """
    out: list[tuple[str, str]] = []
    for item in _history_entries(context_history, task_id):
        if not isinstance(item, dict):
            continue
        role = str(item.get("role", item.get("from", ""))).strip().casefold()
        text = item.get("content", item.get("value", item.get("text")))
        if not isinstance(text, str) or not text.strip():
            continue
        who = "human" if role in _HUMAN_ROLES else "gpt" if role in _GPT_ROLES else None
        if who is None:
            continue
        if out and out[-1][0] == who:
            out[-1] = (who, out[-1][1] + "\n\n" + text.strip())
        elif out or who == "human":
            out.append((who, text.strip()))
    return out
