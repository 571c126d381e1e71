"""Run in the trainer environment: load curated files with HF `datasets`, then TRL's SFT preparation.

    .venv-trainer/bin/python tests/curator/trl_check.py WORKDIR FORMAT TRAIN HELDOUT [FORMAT TRAIN HELDOUT ...]

ShareGPT turns ({"from","value"}) and Alpaca fields become chat messages (the trainer's role mapping),
SFTTrainer prepares both splits with the tiny tokenizer's chat template, and one JSON line reports what
came out per dataset. Nothing is downloaded: the model and tokenizer are built on the spot.
"""

from __future__ import annotations

import json
import os
import sys

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)
sys.modules["torchvision"] = None  # type: ignore[assignment]  # CUDA wheel beside CPU torch: never needed here

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def to_messages(ex: dict) -> dict:
    if "conversations" in ex:
        return {"messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in ex["conversations"]]}
    user = ex["input"]
    return {"messages": [{"role": "system", "content": ex["instruction"]}, {"role": "user", "content": user},
                         {"role": "assistant", "content": ex["output"]}]}


def main() -> None:
    work, rest = sys.argv[1], sys.argv[2:]
    from pathlib import Path

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fixtures.tiny import build

    model_dir = Path(work) / "tiny"
    build(model_dir, vocab_size=512, hidden=32, layers=1, heads=2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for i in range(0, len(rest), 3):
        fmt, train_path, heldout_path = rest[i : i + 3]
        ds = load_dataset("json", data_files={"train": train_path, "heldout": heldout_path})
        expected = {"alpaca": {"instruction", "input", "output"}, "sharegpt": {"conversations"}}[fmt]
        assert set(ds["train"].column_names) == expected, ds["train"].column_names
        msgs = ds.map(to_messages, remove_columns=ds["train"].column_names)
        args = SFTConfig(output_dir=str(Path(work) / f"out-{fmt}"), max_length=1024, report_to=[], use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=msgs["train"], eval_dataset=msgs["heldout"],
                             processing_class=tok)
        train, held = trainer.train_dataset, trainer.eval_dataset
        first = tok.decode(train[0]["input_ids"])
        print(json.dumps({
            "format": fmt, "raw_train": len(ds["train"]), "raw_heldout": len(ds["heldout"]),
            "train": len(train), "heldout": len(held), "columns": sorted(train.column_names),
            "min_tokens": min(len(x) for x in train["input_ids"]),
            "chat_template_used": "<|im_start|>assistant" in first,
        }))


if __name__ == "__main__":
    main()
