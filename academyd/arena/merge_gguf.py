"""Merge a GGUF LoRA adapter into its base GGUF: one model file, what Ollama from 0.34.1 on can serve.

    python -m academyd.arena.merge_gguf BASE.gguf ADAPTER.gguf OUT.gguf [--type q8_0|f16]

Ollama 0.34.1 stopped creating models with an ADAPTER layer ("LoRA adapters are deprecated; the adapter
layer is carried over but new adapters cannot be created"); a model created FROM one GGUF still works.
For every weight the adapter touches (`<name>.lora_a`, r x in, and `<name>.lora_b`, out x r, as
`academyd.arena.export_gguf` writes them, q/k rows already in llama.cpp's rotary order):

    W' = dequantize(W) + (alpha / r) * lora_b @ lora_a        stored as Q8_0 (default) or F16

which is what llama.cpp computes at run time with the adapter loaded at scale 1. Never a 4-bit type: its
step (a 16-level grid per block of 32) is larger than most of a LoRA's deltas, which would round away.
Every other tensor is copied byte for byte (the base's own quantization: the merged model differs from
the base only where the adapter does). The key/values are the base's, plus `academy.merged.*` (the
adapter's sha256 and base sha256, the type, the scale) so the file says what it was made of.

Only `gguf` and numpy: it runs in either interpreter, but the follower runs it in the trainer's (a child
process, off the daemon's loop and memory). The adapter must record this base (`check_adapter_base`).
Prints one JSON line: {"path", "sha256", "type", "tensors", "merged", "params_merged", "read_s",
"merge_s", "per_tensor_s", "per_mparam_s", "total_s"}; exit 2 with {"error", "reason"} on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

MERGE_TYPES = ("q8_0", "f16")
KEY_ADAPTER_SHA256 = "academy.merged.adapter_sha256"
KEY_BASE_SHA256 = "academy.merged.base_sha256"
KEY_TYPE = "academy.merged.type"
KEY_SCALE = "academy.merged.scale"


def merged_file_name(out_type: str) -> str:
    """Where a version's merged model lives: `models/<vN>/merged-q8_0.gguf` (the arena's: in `arena/`)."""
    return f"merged-{out_type}.gguf"


class MergeError(ValueError):
    """The adapter cannot be merged into this base; the message says why."""


def _adapter_pairs(reader: Any) -> tuple[dict[str, tuple[Any, Any]], float | None]:
    tensors = {t.name: t for t in reader.tensors}
    pairs: dict[str, tuple[Any, Any]] = {}
    for name, t in tensors.items():
        if name.endswith(".lora_a"):
            target = name[: -len(".lora_a")]
            b = tensors.get(target + ".lora_b")
            if b is None:
                raise MergeError(f"the adapter has {name} but no {target}.lora_b")
            pairs[target] = (t, b)
        elif name.endswith(".lora_b") and name[: -len(".lora_b")] + ".lora_a" not in tensors:
            raise MergeError(f"the adapter has {name} but no lora_a beside it")
        elif not name.endswith((".lora_a", ".lora_b")):
            raise MergeError(f"unexpected tensor {name} in a LoRA adapter")
    field = reader.fields.get("adapter.lora.alpha")
    alpha = float(field.contents()) if field is not None else None
    return pairs, alpha


def _as_f32(tensor: Any) -> Any:
    import gguf
    import numpy as np

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def merged_weight(w: Any, a: Any, b: Any, scale: float) -> Any:
    """W + scale * B @ A (all float32, W out x in, A r x in, B out x r). Pure."""
    import numpy as np

    return (w + np.float32(scale) * (b.astype(np.float32) @ a.astype(np.float32))).astype(np.float32)


def merge(base: Path, adapter: Path, out: Path, *, out_type: str = "q8_0") -> dict[str, Any]:
    import gguf
    import numpy as np

    from academyd.basemodel import KEY_BASE_SHA256 as KEY_ADAPTER_BASE, cached_sha256, gguf_metadata

    if out_type not in MERGE_TYPES:
        raise MergeError(f"--type {out_type}: merged weights are stored as {' or '.join(MERGE_TYPES)} (a 4-bit "
                         "type would round most of the adapter's deltas away)")
    meta = gguf_metadata(adapter)
    if meta.get("general.type") != "adapter":
        raise MergeError(f"{adapter} is not a GGUF adapter (general.type {meta.get('general.type')!r})")
    # The base the adapter records (the Academy's key, or GGUF's general.base_model.0.sha256): this one.
    recorded = meta.get(KEY_ADAPTER_BASE) or meta.get("general.base_model.0.sha256")
    if recorded != cached_sha256(base):
        raise MergeError(f"adapter {adapter} was trained on {meta.get('general.base_model.0.name') or '?'} "
                         f"(sha256 {str(recorded)[:16]}...), not on {base} (sha256 {cached_sha256(base)[:16]}...): "
                         "refused" if recorded else f"adapter {adapter} records no base model sha256: it cannot "
                         f"be shown to belong to {base}")
    t0 = time.perf_counter()
    areader = gguf.GGUFReader(str(adapter))
    pairs, alpha = _adapter_pairs(areader)
    if not pairs:
        raise MergeError(f"{adapter} holds no LoRA tensors")
    breader = gguf.GGUFReader(str(base))
    arch = breader.fields["general.architecture"].contents()
    base_tensors = {t.name: t for t in breader.tensors}
    missing = sorted(set(pairs) - set(base_tensors))
    if missing:
        raise MergeError(f"the adapter adapts {missing[0]} (and {len(missing) - 1} more), which {base} does not have")
    read_s = time.perf_counter() - t0

    qtype = gguf.GGMLQuantizationType.Q8_0 if out_type == "q8_0" else gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    tmp = out.with_name(out.name + ".part")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in breader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    rank = int(next(iter(pairs.values()))[0].data.shape[0])
    scale = (alpha if alpha is not None else rank) / rank
    writer.add_string(KEY_ADAPTER_SHA256, cached_sha256(adapter))
    writer.add_string(KEY_BASE_SHA256, cached_sha256(base))
    writer.add_string(KEY_TYPE, out_type)
    writer.add_float32(KEY_SCALE, float(scale))

    # Tensor infos first (sizes known ahead), then the data streamed tensor by tensor: one tensor in memory.
    plan: list[tuple[Any, Any]] = []  # (base tensor, its output type or None: copied as is)
    for t in breader.tensors:
        if t.name in pairs:
            rows, cols = (int(x) for x in reversed([int(n) for n in t.shape]))
            ttype = qtype if cols % block == 0 else gguf.GGMLQuantizationType.F16
            shape = gguf.quant_shape_to_byte_shape((rows, cols), ttype) if ttype != gguf.GGMLQuantizationType.F16 \
                else (rows, cols)
            dtype = np.uint8 if ttype != gguf.GGMLQuantizationType.F16 else np.float16
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes, ttype)
            plan.append((t, ttype))
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            plan.append((t, None))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    merge_s, params = 0.0, 0
    for t, ttype in plan:
        if ttype is None:
            writer.write_tensor_data(t.data)
            continue
        tm = time.perf_counter()
        a_t, b_t = pairs[t.name]
        w = _as_f32(t)
        m = merged_weight(w, _as_f32(a_t), _as_f32(b_t), scale)
        data = m.astype(np.float16) if ttype == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(m, ttype)
        merge_s += time.perf_counter() - tm
        params += int(m.size)
        writer.write_tensor_data(data)
    writer.close()
    import os

    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    n = len(pairs)
    return {"path": str(out), "sha256": cached_sha256(out), "type": out_type, "tensors": len(plan), "merged": n,
            "params_merged": params, "scale": scale, "read_s": round(read_s, 3), "merge_s": round(merge_s, 3),
            "per_tensor_s": merge_s / n, "per_mparam_s": merge_s / (params / 1e6),
            "total_s": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m academyd.arena.merge_gguf", description=__doc__.split("\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--type", default="q8_0", choices=MERGE_TYPES)
    a = p.parse_args(argv)
    try:
        for what, path in (("base", a.base), ("adapter", a.adapter)):
            if not path.is_file():
                raise MergeError(f"the {what} {path} does not exist")
        info = merge(a.base, a.adapter, a.out, out_type=a.type)
    except MergeError as exc:
        print(json.dumps({"error": "bad_input", "reason": str(exc)}), flush=True)
        return 2
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
