"""The trainer: LoRA fine-tuning in its own environment (.venv-trainer), driven by a JSON spec.

The daemon never imports this package's modules except `academyd.trainer.spec` (stdlib only). The rest
imports torch and runs as `python -m academyd.trainer SPEC.json` (see `__main__` for the protocol),
`python -m academyd.trainer.tiny DIR` and `python -m academyd.trainer.evaluate ...`.
"""
