"""The machine and the model: versions, device, and the LoRA model on Unsloth or transformers+peft.

Imports torch and the training libraries only inside its functions, so importing it stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from academyd.trainer import spec as S
from academyd.trainer.errors import BadInput

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "unsloth", "unsloth_zoo", "trl", "tokenizers")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def detect_device() -> tuple[str, str, int | None]:
    """(device, description, memory bytes): GPU memory on CUDA, available RAM on the CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return "cuda", f"cuda:0 {props.name}", int(props.total_memory)
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return "cpu", f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", mem


def load_backend(spec: S.TrainSpec, hp: S.Hyperparameters, device: str,
                 model_path: str | None = None) -> tuple[Any, Any, str, str | None]:
    """(peft model, tokenizer, backend name, why not unsloth). Unsloth first unless backend=peft.

    `model_path` is the loadable form of `spec.base_model` (a GGUF base's dequantized directory)."""
    note = None
    model_path = model_path or spec.base_model
    if spec.backend in ("auto", "unsloth"):
        try:
            import unsloth  # noqa: F401  (must come before transformers: it patches it)
            from unsloth import FastLanguageModel
        except Exception as exc:  # noqa: BLE001 - any import failure means: fall back
            if spec.backend == "unsloth":
                raise BadInput(f"backend=unsloth but unsloth cannot be imported ({type(exc).__name__}: {exc}); "
                               "rebuild the trainer environment (make trainer-env) or use backend auto/peft") from None
            note = f"unsloth unavailable ({type(exc).__name__}: {exc}); using transformers+peft"
        else:
            import torch

            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=model_path,
                max_seq_length=hp.max_length,
                # Unsloth's auto dtype picks bf16 on CPUs with AVX512-BF16/AMX and fp32 elsewhere, so the same
                # spec trained different numbers per CPU model: on the CPU we train in fp32, everywhere.
                dtype=None if device == "cuda" else torch.float32,
                load_in_4bit=hp.load_in_4bit and device == "cuda",
                local_files_only=True,
            )
            model = FastLanguageModel.get_peft_model(
                model,
                r=hp.lora_r,
                lora_alpha=hp.lora_alpha,
                lora_dropout=hp.lora_dropout,
                target_modules=list(hp.target_modules),
                bias="none",
                use_gradient_checkpointing="unsloth" if device == "cuda" else False,
                random_state=spec.seed,
            )
            return model, tokenizer, "unsloth", None
    else:
        note = "backend=peft requested"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True).to(device)
    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA's A matrices are drawn from torch's global generator: seed it, or two runs of one spec differ.
    torch.manual_seed(spec.seed)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise BadInput(f"cannot put LoRA on {spec.base_model}: {exc}; set hyperparameters.target_modules "
                       "to modules this model has") from None
    return model, tokenizer, "peft", note
