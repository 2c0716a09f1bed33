"""Loading a fine-tuned model: ``pip:<package>``, a local Hugging Face folder, or a hub id."""

from slimline.models.loader import load_model, resolve_source

__all__ = ["load_model", "resolve_source"]
