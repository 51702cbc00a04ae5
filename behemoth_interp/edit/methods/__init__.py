"""The edit methods, one module each; importing this package registers them all."""

from behemoth_interp.edit.methods import alphaedit, finetune, lora, memit, rome

__all__ = ["alphaedit", "finetune", "lora", "memit", "rome"]
