"""An LLM judge comparing two answers pairwise, in both orders; only consistent wins count.

The judge is any chat endpoint: an OpenAI-compatible server (`judge_url` ending in `/v1`, e.g.
`http://127.0.0.1:11434/v1` for Ollama's compatible API, vLLM, llama.cpp's server) or Ollama's native
`/api/chat` (any other `judge_url`, e.g. `http://127.0.0.1:11434`). Asked twice per question, with the
answers swapped; a win counts only when the judge picks the same answer both times, which cancels the
well-known position bias of LLM judges.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from academyd.httpjson import call_json

PROMPT = (
    "You compare two answers to the same request. Judge correctness first, then helpfulness.\n\n"
    "Request:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Reply with exactly one word: A, B or TIE."
)
_CHOICE = re.compile(r"\b(A|B|TIE)\b")


class JudgeError(Exception):
    """The judge endpoint failed; the message names it and what it said."""


def parse_choice(text: str) -> str:
    """'A', 'B' or 'TIE' from the judge's reply (anything unreadable counts as a tie)."""
    m = _CHOICE.search(text.strip().upper())
    return m.group(1) if m else "TIE"


async def ask(session: aiohttp.ClientSession, url: str, model: str, prompt: str, timeout_s: float) -> str:
    """One chat turn at temperature 0; returns the reply text."""
    messages = [{"role": "user", "content": prompt}]
    base = url.rstrip("/")
    if base.endswith("/v1"):
        endpoint, body = base + "/chat/completions", {"model": model, "messages": messages, "temperature": 0}
    else:
        endpoint = base + "/api/chat"
        body = {"model": model, "messages": messages, "stream": False, "options": {"temperature": 0}}
    status, data = await call_json(session, "POST", endpoint, timeout_s, error=JudgeError, json=body)
    if status >= 400 or not isinstance(data, dict):
        raise JudgeError(f"judge {endpoint} answered HTTP {status}: {data}")
    if "choices" in data:
        return str(data["choices"][0]["message"]["content"])
    return str((data.get("message") or {}).get("content", ""))


async def judge(
    examples: list[dict[str, Any]], *, url: str, model: str, timeout_s: float,
    session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """Compare `candidate` and `champion` answers of each example (`question`, `candidate`, `champion`).

    Returns {n, candidate_wins, champion_wins, ties, model, decisions: [[first, second], ...]}.
    """
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        cand = champ = ties = 0
        decisions = []
        for ex in examples:
            q = ex.get("question") or ex.get("reference", "")
            first = parse_choice(await ask(session, url, model, PROMPT.format(question=q, a=ex["candidate"],
                                                                              b=ex["champion"]), timeout_s))
            second = parse_choice(await ask(session, url, model, PROMPT.format(question=q, a=ex["champion"],
                                                                               b=ex["candidate"]), timeout_s))
            decisions.append([first, second])
            if first == "A" and second == "B":
                cand += 1
            elif first == "B" and second == "A":
                champ += 1
            else:
                ties += 1
        return {"n": len(examples), "candidate_wins": cand, "champion_wins": champ, "ties": ties,
                "model": model, "decisions": decisions}
    finally:
        if own:
            await session.close()
