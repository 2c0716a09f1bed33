"""Weight-space pruning on the torch model, before export (magnitude, N:M, Wanda, structured).

No pruning stage is registered yet; `prune.*` kinds join the table in ``slimline/pipeline.py``.
"""
