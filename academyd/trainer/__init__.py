"""The trainer: LoRA fine-tuning in its own environment (.venv-trainer), driven by a JSON spec.

The daemon never imports this package's modules except `academyd.trainer.spec` (stdlib only). The rest
imports torch and runs as `python -m academyd.trainer SPEC.json` (see `__main__` for the protocol),
and `python -m academyd.trainer.evaluate ...` (the tests' tiny stand-in base is tests/fixtures/tiny.py).
"""
