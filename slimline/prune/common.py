"""What every pruner shares: finding the Linear layers a recipe names, running calibration text
through the model with hooks, and measuring each layer's output error on that text."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.models.modules import forward

# Layers no weight pruner touches by default: the pooler and classifier heads are tiny and sensitive.
DEFAULT_EXCLUDE = ("pooler.*", "classifier*", "lm_head*")


def clone(artifact: TorchModel) -> TorchModel:
    """A deep copy: stages never mutate their input (it may be the evaluation's fp32 reference)."""
    return TorchModel(model=copy.deepcopy(artifact.model), tokenizer=artifact.tokenizer, info=artifact.info)


def linear_layers(model: Any, include: list[str], exclude: list[str], kind: str, ctx: Any) -> dict[str, Any]:
    """name -> nn.Linear, filtered by glob patterns; warns for a pattern that matches nothing."""
    import torch

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for pattern in [*include, *exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            ctx.warn(f"{kind}: pattern `{pattern}` matches no Linear layer (e.g. {next(iter(linears), 'none')}).")
    chosen = {
        n: m
        for n, m in linears.items()
        if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
        and not any(fnmatch.fnmatchcase(n, p) for p in [*exclude, *DEFAULT_EXCLUDE])
    }
    if not chosen:
        raise StageError(f"{kind}: no Linear layer left to prune after include={include} exclude={exclude}. Widen `include`.")
    return chosen


def token_gram(x: Any, mask: Any, constant: bool = False) -> Any:
    """Sum over real tokens of x x^T in float64; with ``constant``, of [x 1] [x 1]^T (to fit a bias).

    ``x`` is a Linear's input, (B, T, in); padded positions carry nothing a server computes.
    """
    import torch

    x = x.detach().double()
    if x.dim() == 3:
        x = x[mask.bool()]
    if constant:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return x.T @ x


def output_error(reference: Any, pruned: Any, batches: list[dict]) -> dict[str, float]:
    """Mean and min cosine of the model's first output (pooled over real tokens) on calibration text."""
    import numpy as np
    import torch

    from slimline.measure.metrics import cosine, cosine_summary, pool

    cos = []
    with torch.no_grad():
        for b in batches:
            a, p = forward(reference, b)[0].float().numpy(), forward(pruned, b)[0].float().numpy()
            if a.ndim == 3:
                mask = b["attention_mask"].numpy()
                a, p = pool(a, mask), pool(p, mask)
            cos.append(cosine(a, p))
    return cosine_summary(np.concatenate(cos))


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def next_token_fidelity(reference: Any, model: Any, batches: list[dict]) -> dict[str, float]:
    """For a language model: how often its next-token choice matches the reference's (top-1 agreement)
    and the mean KL(reference || model) of the next-token distributions, over real tokens."""
    import torch

    agree, kl = [], []
    with torch.no_grad():
        for batch in batches:
            real = batch["attention_mask"].bool()
            a, p = forward(reference, batch)[0], forward(model, batch)[0]
            agree.append((a.argmax(-1)[real] == p.argmax(-1)[real]).double())
            kl.append(token_kl(a, p)[real].double())
    return {"top1_agreement": round(float(torch.cat(agree).mean()), 5), "token_kl": round(float(torch.cat(kl).mean()), 5)}


def token_kl(teacher_logits: Any, student_logits: Any) -> Any:
    """KL(teacher || student) of each position's next-token distribution, ``[B, T]``."""
    import torch

    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)
