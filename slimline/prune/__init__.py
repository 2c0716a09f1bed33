"""Weight-space pruning on the torch model, before export: magnitude, N:M (2:4), Wanda (activation-aware),
structured heads and FFN channels, and distillation to recover (``prune.recover``). The stages are
registered in ``slimline/registry.py``."""
