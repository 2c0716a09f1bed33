"""Weight pruning that zeroes entries without changing shapes: ``prune.magnitude``, ``prune.nm``
(N:M semi-structured, 2:4 by default) and ``prune.wanda`` (activation-aware, optionally with a
least-squares reconstruction of the kept weights).

These make the weights *compressible*, not the model faster: ONNX Runtime's CPU kernels are dense,
so the report gives the accuracy cost and the size when stored compressed, and says so. 2:4 is the
pattern NVIDIA's sparse tensor cores run at up to 2x; the GPU issue measures that.

Every stage reports the achieved sparsity per layer and overall, and each layer's relative output
error on calibration text, computed exactly from the Gram matrix H = X^T X of the layer's inputs:
||(W - W') X||^2 / ||W X||^2 = tr(D H D^T) / tr(W H W^T), with D = W - W'.
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import Field, model_validator

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_batches
from slimline.models.modules import forward, hooks
from slimline.prune.common import (
    clone,
    count_params,
    linear_layers,
    output_error,
    token_gram,
)
from slimline.stage import Context, Stage, StageResult


def input_grams(model, modules, batches) -> dict:
    """Per layer, H = sum over real calibration tokens of x x^T (float64)."""
    import torch

    grams: dict = {}
    state: dict = {}

    def collect(name, module, inputs, output):
        grams[name] = grams.get(name, 0) + token_gram(inputs[0], state["mask"])

    with torch.no_grad(), hooks(modules, collect):
        for b in batches:
            state["mask"] = b["attention_mask"]
            forward(model, b)
    return grams


def relative_output_error(w, w_new, gram) -> float:
    d, w = (w - w_new).double(), w.double()
    num, den = (d @ gram @ d.T).trace(), (w @ gram @ w.T).trace()
    return float((num / den).sqrt()) if den > 0 else 0.0


def magnitude_mask(scores, sparsity: float):
    """A keep-mask zeroing exactly round(sparsity * n) entries with the lowest scores."""
    import torch

    n = scores.numel()
    k = int(round(sparsity * n))
    mask = torch.ones(n, dtype=torch.bool)
    if k:
        mask[torch.argsort(scores.flatten())[:k]] = False
    return mask.reshape(scores.shape)


def nm_mask(scores, n: int, m: int):
    """Keep the n highest-scoring of every m consecutive inputs in each output row."""
    import torch

    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def reconstruct(w, mask, gram, damp: float = 0.01):
    """Per output row, the kept weights that best reproduce the dense row's output on the
    calibration inputs: w_K = (H_KK + lambda I)^-1 H_K: w (ridge least squares)."""
    import torch

    w64 = w.double()
    out = torch.zeros_like(w64)
    ridge = damp * gram.diagonal().mean()
    for row in range(w.shape[0]):
        keep = mask[row].nonzero().flatten()
        if len(keep) == 0:
            continue
        h_kk = gram[keep][:, keep] + ridge * torch.eye(len(keep), dtype=gram.dtype)
        out[row, keep] = torch.linalg.solve(h_kk, gram[keep] @ w64[row])
    return out.to(w.dtype)


class _WeightPruner(Stage):
    consumes = (TorchModel,)

    include: list[str] = Field(default_factory=list, description="glob patterns of Linear layers to prune (default: all)")
    exclude: list[str] = Field(default_factory=list, description="glob patterns kept dense (pooler/classifier always are)")
    samples: int = Field(128, ge=1, le=1_000_000, description="calibration texts for scores and the per-layer error")

    def masks(self, weight, norm):  # pragma: no cover - abstract
        """Keep-mask for one layer's weight; ``norm`` is ||X_j|| per input feature."""
        raise NotImplementedError

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        import torch

        out = clone(artifact)
        model = out.model
        layers = linear_layers(model, self.include, self.exclude, self.kind, ctx)
        self.check_layers(layers)
        batches = calibration_batches(out.tokenizer, ctx.data.calibration[: self.samples])
        grams = input_grams(model, layers, batches)
        report: dict = {}
        zeros = total = 0
        errors = {}
        with torch.no_grad():
            masks = self.global_masks(layers, grams)
            for name, layer in layers.items():
                w = layer.weight
                gram = grams[name]
                mask = masks[name] if masks else self.masks(w, gram.diagonal().sqrt().to(w.dtype))
                new = w * mask
                if getattr(self, "reconstruct", False):
                    new = reconstruct(w, mask, gram, self.damp) * mask
                errors[name] = relative_output_error(w, new, gram)
                layer.weight.copy_(new)
                z = int((new == 0).sum())
                zeros += z
                total += new.numel()
                report[f"sparsity.{name}"] = round(z / new.numel(), 4)
        report["sparsity.overall"] = round(zeros / total, 5)
        report["layers_pruned"] = len(layers)
        report["params"] = count_params(model)
        report["params_nonzero"] = count_params(model) - zeros
        worst = sorted(errors.items(), key=lambda kv: -kv[1])
        report["layer_error.median"] = round(sorted(errors.values())[len(errors) // 2], 5)
        for name, err in worst[:5]:
            report[f"layer_error.worst.{name}"] = round(err, 5)
        dense = sum(m.weight.numel() * 4 for m in layers.values())
        packed = sum(len(zlib.compress(m.weight.detach().numpy().tobytes(), 1)) for m in layers.values())
        report["pruned_weights_mb.dense"] = round(dense / 1e6, 2)
        report["pruned_weights_mb.zlib"] = round(packed / 1e6, 2)
        report.update(output_error(artifact.model, model, batches[:4]))
        report["speed_note"] = "zeros are stored densely: no CPU speedup without a sparse kernel"
        return StageResult(out, report)

    def check_layers(self, layers) -> None:
        pass

    def global_masks(self, layers, grams):
        return None


class Magnitude(_WeightPruner):
    """Zero the smallest-magnitude weights, per layer or globally."""

    kind = "prune.magnitude"

    sparsity: float = Field(ge=0, lt=1, description="fraction of weights zeroed")
    scope: Literal["layer", "global"] = Field("layer", description="layer: the same sparsity in every layer")

    def masks(self, weight, norm):
        return magnitude_mask(weight.abs(), self.sparsity)

    def global_masks(self, layers, grams):
        import torch

        if self.scope != "global":
            return None
        flat = torch.cat([m.weight.abs().flatten() for m in layers.values()])
        keep = magnitude_mask(flat, self.sparsity)
        masks, start = {}, 0
        for name, m in layers.items():
            masks[name] = keep[start : start + m.weight.numel()].reshape(m.weight.shape)
            start += m.weight.numel()
        return masks


class _NMOptions(Stage):
    n: int = Field(2, ge=1, le=64)
    m: int = Field(4, ge=2, le=64)

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be below m={self.m} (e.g. 2:4)")
        return self


def _check_divisible(kind: str, layers, m: int) -> None:
    bad = [f"{name} (in_features={layer.in_features})" for name, layer in layers.items() if layer.in_features % m]
    if bad:
        raise StageError(
            f"{kind}: {len(bad)} layer(s) have in_features not divisible by m={m}: {', '.join(bad[:5])}. "
            "Add them to `exclude`, or choose an m that divides them."
        )


class NM(_WeightPruner, _NMOptions):
    """N:M semi-structured sparsity (2:4 by default) along the input dimension."""

    kind = "prune.nm"

    def check_layers(self, layers) -> None:
        _check_divisible(self.kind, layers, self.m)

    def masks(self, weight, norm):
        return nm_mask(weight.abs(), self.n, self.m)


class Wanda(_WeightPruner):
    """Activation-aware pruning: score |W_ij| * ||X_j||, per output row or N:M."""

    kind = "prune.wanda"

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction zeroed per output row (pattern: unstructured)")
    pattern: Literal["unstructured", "nm"] = "unstructured"
    n: int = Field(2, ge=1, le=64)
    m: int = Field(4, ge=2, le=64)
    reconstruct: bool = Field(False, description="refit kept weights by least squares (SparseGPT-style)")
    damp: float = Field(0.01, gt=0)

    @model_validator(mode="after")
    def _n_below_m(self) -> Wanda:
        if self.pattern == "nm" and self.n >= self.m:
            raise ValueError(f"prune.wanda: n={self.n} must be below m={self.m} (e.g. 2:4)")
        return self

    def check_layers(self, layers) -> None:
        if self.pattern == "nm":
            _check_divisible(self.kind, layers, self.m)

    def masks(self, weight, norm):
        import torch

        score = weight.abs() * norm[None, :]  # (out, in)
        if self.pattern == "nm":
            return nm_mask(score, self.n, self.m)
        k = int(round(self.sparsity * weight.shape[1]))
        mask = torch.ones_like(weight, dtype=torch.bool)
        if k:
            mask.scatter_(1, torch.argsort(score, dim=1)[:, :k], False)
        return mask
