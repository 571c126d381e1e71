"""The serving side of the hot swap: `academyd follow` and the `Follower` class Venom can embed.

- `follower`: the durable consumer of `model.promoted` / `model.rolled_back` and the rules of a swap;
- `verify`: sha256 and base identity of an adapter, before it touches a runtime;
- `targets`: llama.cpp (the endpoint below), Ollama's HTTP API, Venom's activate API;
- `endpoint`: an OpenAI-compatible llama.cpp server whose adapter swaps in place (runs under an
  interpreter with llama-cpp-python, never the daemon's).
"""

from typing import Any

__all__ = ["Follower"]


def __getattr__(name: str) -> Any:
    # Lazy: the endpoint runs under the runtime's interpreter, which has none of the daemon's packages.
    if name == "Follower":
        from academyd.follower.follower import Follower

        return Follower
    raise AttributeError(name)
