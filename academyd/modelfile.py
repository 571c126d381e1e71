"""The Modelfile of a version: Ollama's TEMPLATE translated from the tokenizer's chat template (when it is a
family known here), SYSTEM, and PARAMETER lines. Text only: no I/O beyond reading the adapter's
tokenizer files, no Ollama (academyd.ollama), no registry (academyd.champion.artifacts builds the artifacts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from academyd.settings import Settings

# (marker, stop, Ollama template (Go text/template)) for the chat-template families we can recognise in a tokenizer's
# Jinja template. Anything else gets no TEMPLATE line: Ollama then uses the base model's own template.
OLLAMA_TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "<|im_end|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|start_header_id|>",
        "<|eot_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma": (
        "<start_of_turn>",
        "<end_of_turn>",
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ),
    "mistral": (
        "[INST]",
        "</s>",
        "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
        "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
    ),
}


def ollama_template(chat_template: str | None) -> tuple[str | None, str | None, str | None]:
    """(family, Ollama TEMPLATE, end-of-turn stop) for a tokenizer's Jinja chat template; Nones when the
    family is not recognised."""
    if not chat_template:
        return None, None, None
    for family, (marker, stop, template) in OLLAMA_TEMPLATES.items():
        if marker in chat_template:
            return family, template, stop
    return None, None, None


def tokenizer_facts(adapter_dir: Path) -> dict[str, Any]:
    """The chat template and EOS token the adapter's saved tokenizer declares (plain JSON, no transformers)."""
    facts: dict[str, Any] = {"chat_template": None, "eos_token": None}
    cfg_path = adapter_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        facts["chat_template"] = cfg.get("chat_template")
        eos = cfg.get("eos_token")
        facts["eos_token"] = eos.get("content") if isinstance(eos, dict) else eos
    jinja = adapter_dir / "chat_template.jinja"
    if facts["chat_template"] is None and jinja.is_file():
        facts["chat_template"] = jinja.read_text()
    if isinstance(facts["chat_template"], list):  # several named templates: take "default"
        named = {t.get("name"): t.get("template") for t in facts["chat_template"] if isinstance(t, dict)}
        facts["chat_template"] = named.get("default") or next(iter(named.values()), None)
    return facts


def _param_lines(params: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    return lines


def modelfile_text(*, from_: str, adapter: Path, template: str | None, parameters: dict[str, Any],
                   version: str, family: str | None, system: str | None = None) -> str:
    lines = [f"# venom-adapter-{version}, written by academyd", f"FROM {from_}", f"ADAPTER {adapter}"]
    if template is not None:
        lines.append(f"# TEMPLATE: the prompt form the adapter was trained with ({family})")
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the tokenizer's chat template is not a known family; Ollama uses the base's")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += _param_lines(parameters)
    return "\n".join(lines) + "\n"


def model_parameters(settings: Settings, *stops: str | None) -> dict[str, Any]:
    """`arena.modelfile_parameters` with the given stop strings (end of turn, EOS) added to `stop`."""
    params = dict(settings.arena.modelfile_parameters)
    have = params.get("stop") or []
    have = list(have) if isinstance(have, list) else [have]
    for stop in stops:
        if stop and stop not in have:
            have.append(stop)
    if have:
        params["stop"] = have
    return params


# Venom's Alpaca prompt as an Ollama template (what an adapter trained with render = "plain" on Alpaca expects).
ALPACA_TEMPLATE = ("{{ if .System }}### Instruction:\n{{ .System }}\n\n### Input:\n{{ .Prompt }}{{ else }}"
                   "### Instruction:\n{{ .Prompt }}{{ end }}\n\n### Response:\n")


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a chat template adds when a conversation has none (SmolLM2's does): the Modelfile
    says it as SYSTEM, so Ollama's prompt is the one the adapter was trained on."""
    if not chat_template or "messages[0]['role'] != 'system'" not in chat_template:
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template, re.S)
    return m.group(1) if m else None
