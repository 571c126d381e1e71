"""The machine and the model: versions, device, and the LoRA model on Unsloth or transformers+peft.

Imports torch and the training libraries only inside its functions, so importing it stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
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


# On the CPU, `backend=auto` trains with whichever backend was measured faster on this machine
# (bench/bench_trainer.py --save-calibration writes the measurement). Without one: transformers+peft, measured
# faster on the reference 2-core VM (SmolLM2-135M, 2 threads: peft 142 vs Unsloth 121 tokens/s, issue 21).
CALIBRATION_FILE = "trainer-backends.json"
DEFAULT_CPU_BACKEND = "peft"


def calibration_path() -> Path:
    if os.environ.get("ACADEMY_TRAINER_CALIBRATION"):
        return Path(os.environ["ACADEMY_TRAINER_CALIBRATION"])
    from academyd.basemodel import cache_root

    return cache_root() / CALIBRATION_FILE


def machine_key() -> str:
    """What a calibration holds for: the CPU model, its count, and the backends' versions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    v = versions()
    return f"{model} x{os.cpu_count()} | torch {v.get('torch')} peft {v.get('peft')} unsloth {v.get('unsloth')}"


def read_calibration(path: Path | None = None) -> dict[str, Any] | None:
    try:
        data = json.loads((path or calibration_path()).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def auto_cpu_backend(calibration: dict[str, Any] | None, machine: str) -> tuple[str, str]:
    """(backend, why) for backend=auto on the CPU: the faster one measured on this machine. Pure."""
    rates = (calibration or {}).get("tokens_per_s") if (calibration or {}).get("machine") == machine else None
    if (isinstance(rates, dict) and all(isinstance(rates.get(b), (int, float)) and rates[b] > 0
                                        for b in ("unsloth", "peft"))):
        best = "unsloth" if rates["unsloth"] > rates["peft"] else "peft"
        return best, (f"backend=auto on the CPU: {best}, measured faster on this machine (unsloth "
                      f"{rates['unsloth']:.0f} vs peft {rates['peft']:.0f} tokens/s)")
    if calibration is None:
        why = "no measurement for this machine"
    elif calibration.get("machine") != machine:
        why = "the measurement is of another machine"
    else:
        why = "the measurement is incomplete"
    return DEFAULT_CPU_BACKEND, (f"backend=auto on the CPU: {DEFAULT_CPU_BACKEND} ({why}; measured faster on a "
                                 "2-core VM: 142 vs 121 tokens/s; bench/bench_trainer.py --save-calibration "
                                 "measures this one)")


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
    """(peft model, tokenizer, backend name, why this backend). On CUDA Unsloth first unless backend=peft;
    on the CPU `auto` is the backend measured faster (auto_cpu_backend); MiCA always trains on peft.

    `model_path` is the loadable form of `spec.base_model` (a GGUF base's dequantized directory)."""
    note = None
    model_path = model_path or spec.base_model
    wanted = spec.backend
    if wanted == "auto" and device != "cuda":
        wanted, note = auto_cpu_backend(read_calibration(), machine_key())
    if hp.adapter == "mica" and wanted in ("auto", "unsloth"):
        if spec.backend == "unsloth":
            raise BadInput("adapter=mica needs transformers+peft (PEFT's init_lora_weights='mica'); "
                           "use backend auto or peft")
        wanted, note = "peft", "adapter=mica: transformers+peft (Unsloth has no MiCA init)"
    if wanted in ("auto", "unsloth"):
        try:
            import unsloth  # noqa: F401  (must come before transformers: it patches it)
            from unsloth import FastLanguageModel
        except Exception as exc:  # noqa: BLE001 - any import failure means: fall back
            if spec.backend == "unsloth":
                raise BadInput(f"backend=unsloth but unsloth cannot be imported ({type(exc).__name__}: {exc}); "
                               "rebuild the trainer environment (make trainer-env) or use backend auto/peft") from None
            note = ((note + "; ") if note else "") + \
                f"unsloth unavailable ({type(exc).__name__}: {exc}); using transformers+peft"
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
                use_rslora=hp.use_rslora,
            )
            return model, tokenizer, "unsloth", note
    elif spec.backend == "peft":
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
        use_rslora=hp.use_rslora,
        init_lora_weights="mica" if hp.adapter == "mica" else True,
    )
    # LoRA's A matrices are drawn from torch's global generator: seed it, or two runs of one spec differ.
    torch.manual_seed(spec.seed)
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise BadInput(f"cannot put LoRA on {spec.base_model}: {exc}; set hyperparameters.target_modules "
                       "to modules this model has") from None
    return model, tokenizer, "peft", note
