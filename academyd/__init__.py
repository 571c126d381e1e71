"""The Academy: Venom's learning loop.

This package must stay light: the daemon never imports torch. The trainer (`academyd.trainer`) runs in
its own interpreter and is the only part that imports torch, transformers, peft or unsloth.
"""

__version__ = "0.1.0"
