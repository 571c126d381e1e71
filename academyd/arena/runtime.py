"""The serving runtime: llama.cpp (llama-cpp-python) with the GGUF base and a GGUF LoRA adapter.

Runs in the trainer environment (llama-cpp-python is installed there, `academyd/trainer/requirements.txt`);
`llama_cpp` is imported only when a runtime is opened, so the constants and helpers here import anywhere.
The arena (`academyd.arena.measure`) judges candidates with it, and the follower probes a deployed version
with the same prompts and the same calls:

    from academyd.arena import runtime
    rt = runtime.open_runtime(base_gguf, adapter_gguf)          # adapter_gguf None: the base alone
    rt.answer(runtime.chat("What is the capital of France?"))   # greedy, through the GGUF's chat template
    runtime.answer(base_gguf, adapter_gguf, messages)           # one-shot: open, answer, close

Chat messages are the OpenAI shape ([{"role": "system"|"user"|"assistant", "content": ...}]) and are
rendered by the base model's own chat template (the one the adapter was trained with, see
`academyd.trainer.data`). Greedy means temperature 0 and top_k 1: two runs on one machine give one answer.

Frozen probes. The arena writes `probes.json` (`PROBES_FILE`) into `models/<vN>/arena/`: the prompts it
asked (a seeded sample of the held-out set, plus `GENERAL_PROBES`), the trainer's greedy answer and the
runtime's greedy answer to each, the base GGUF's sha256 and the adapter GGUF's sha256. `read_probes(path)`
reads it back; a consumer asks the same messages of its runtime and compares with `runtime` answers.
Before loading an adapter, `academyd.basemodel.check_adapter_base(adapter_gguf, base_gguf)` refuses an
adapter trained on another base (both names and hashes in the message).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from academyd.files import atomic_write_json

PROBES_FILE = "probes.json"
DEFAULT_CTX = 1024
DEFAULT_MAX_TOKENS = 64

# General questions every version is also probed with (not in the arena's general set, not trained on).
GENERAL_PROBES: tuple[str, ...] = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is 2 plus 3?",
    "Name a color of the rainbow.",
    "What do bees make?",
    "What is the freezing point of water in Celsius?",
)

Messages = list[dict[str, str]]


def chat(question: str, system: str | None = None) -> Messages:
    """A single-turn chat request, as Venom sends one."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


class Runtime:
    """One llama.cpp model: the base GGUF, optionally with one LoRA adapter GGUF applied."""

    def __init__(self, base_gguf: str | Path, adapter_gguf: str | Path | None = None, *,
                 n_ctx: int = DEFAULT_CTX, n_threads: int | None = None, seed: int = 0) -> None:
        from llama_cpp import Llama

        self.base_gguf = str(base_gguf)
        self.adapter_gguf = str(adapter_gguf) if adapter_gguf else None
        threads = n_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or None
        kwargs: dict[str, Any] = {"model_path": self.base_gguf, "n_ctx": n_ctx, "seed": seed, "verbose": False,
                                  "logits_all": True}
        if threads:
            kwargs.update(n_threads=threads, n_threads_batch=threads)
        if self.adapter_gguf:
            kwargs["lora_path"] = self.adapter_gguf
        self.llm = Llama(**kwargs)
        self.n_ctx = n_ctx

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def answer(self, messages: Messages, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> str:
        """The greedy reply to a chat, through the model's chat template."""
        return self.complete(messages, max_tokens=max_tokens)[0]

    def complete(self, messages: Messages, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[str, bool]:
        """(greedy reply, whether it ended by itself): False when `max_tokens` cut it off."""
        out = self.llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, top_p=1.0,
                                              max_tokens=max_tokens, seed=0)
        choice = out["choices"][0]
        return str(choice["message"]["content"] or "").strip(), choice.get("finish_reason") != "length"

    def _logits(self, ids: Sequence[int]) -> Any:
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit the runtime's context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return self.llm.scores[: len(ids)]

    def nll(self, ids: Sequence[int], labels: Sequence[int]) -> tuple[float, int]:
        """(summed negative log-likelihood, token count) of the tokens whose label is not -100 (the
        trainer's labels: response tokens only), each predicted from the tokens before it."""
        import numpy as np

        lab = np.asarray(labels[1:])
        pos = np.nonzero(lab != -100)[0]
        if pos.size == 0:
            return 0.0, 0
        rows = np.asarray(self._logits(ids), dtype=np.float64)[pos]
        top = rows.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        return float((logz - rows[np.arange(pos.size), lab[pos]]).sum()), int(pos.size)

    def top1_agreement(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> float:
        """Teacher-forced agreement: the fraction of `answer_ids` (another engine's greedy reply) that this
        runtime also ranks first at the same position."""
        import numpy as np

        if not answer_ids:
            return 1.0
        ids = list(prompt_ids) + list(answer_ids)
        logits = np.asarray(self._logits(ids))
        best = logits[len(prompt_ids) - 1 : len(ids) - 1].argmax(axis=1)
        return float((best == np.asarray(answer_ids)).mean())


def open_runtime(base_gguf: str | Path, adapter_gguf: str | Path | None = None, **kw: Any) -> Runtime:
    """Load `base_gguf` (with `adapter_gguf` applied) in llama.cpp; see `Runtime`."""
    return Runtime(base_gguf, adapter_gguf, **kw)


def answer(base_gguf: str | Path, adapter_gguf: str | Path | None, messages: Messages, *,
           max_tokens: int = DEFAULT_MAX_TOKENS, n_threads: int | None = None) -> str:
    """Open a runtime, give the greedy answer to `messages`, close it."""
    with open_runtime(base_gguf, adapter_gguf, n_threads=n_threads) as rt:
        return rt.answer(messages, max_tokens=max_tokens)


def write_probes(path: Path, doc: dict[str, Any]) -> None:
    atomic_write_json(path, doc, indent=1, ensure_ascii=False, allow_nan=False)


def read_probes(path: str | Path) -> dict[str, Any]:
    """A version's frozen probes: {"base_sha256", "adapter_gguf_sha256", "max_tokens", "probes": [{"kind":
    "heldout"|"general", "messages", "trainer", "runtime", "agreement"}]}."""
    p = Path(path)
    if p.is_dir():
        p = p / PROBES_FILE
    doc = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("probes"), list):
        raise ValueError(f"{p} is not a probes file (no 'probes' list)")
    return doc


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan
