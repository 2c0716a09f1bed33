"""``prune.structured``: remove whole attention heads and FFN channels, so the model really shrinks.

Unlike masking, the weight tensors get smaller (query/key/value/output lose a head's rows and
columns; the FFN's up projection loses rows, its down projection columns) and the config records it
(``pruned_heads``, ``intermediate_size``), so the export is a smaller graph that runs faster and the
Attention / SkipLayerNormalization / BiasGelu fusions still match.

Which units go, from calibration text alone (no labels or gradients), layer by layer in order:
``selection: obs`` (default) removes, one at a time, the head or channel whose loss after the best
compensation of all the other weights is smallest (Optimal Brain Surgeon on the Gram matrix of the
projection's inputs); ``energy`` ranks units once by E[a^2] * ||w||^2. Either way the projection that
reads the pruned units (W_down, W_o) ends up refit by ridge least squares (``refit: true``), so the
kept units plus a bias reproduce the full layer's output. The same fraction goes from every layer, so
shapes stay uniform and the config can say so. docs/prune.md has the measured effect of each choice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.prune.common import calibration_batches, clone, count_params, forward, output_error, token_gram
from slimline.stage import Context, Stage, StageResult


def bert_blocks(model) -> list | None:
    """The encoder layers of a BERT-family model, or None."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    return list(layers) if layers is not None and hasattr(layers[0], "intermediate") else None


def gated_mlp_blocks(model) -> list | None:
    """The decoder layers of a Llama-style model (``mlp.gate_proj``/``up_proj``/``down_proj``), or None."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    layers = getattr(base, "layers", None)
    ok = layers is not None and all(
        hasattr(getattr(layer, "mlp", None), n) for layer in layers for n in ("gate_proj", "up_proj", "down_proj")
    )
    return list(layers) if ok else None


def unsupported(model) -> StageError:
    return StageError(
        f"prune.structured: model_type `{model.config.model_type}` is not supported yet (BERT-family encoders: heads "
        "and FFN channels; Llama-style decoders with a gated MLP: FFN channels). Use prune.magnitude or prune.wanda instead."
    )


class Structured(Stage):
    """Remove the least important heads and FFN channels of every layer."""

    kind = "prune.structured"
    consumes = (TorchModel,)

    head_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed per layer")
    ffn_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of FFN intermediate channels removed per layer")
    samples: int = Field(4000, ge=1, description="calibration texts used to score and refit (more generalizes better)")
    refit: bool = Field(True, description="refit the projections that read pruned units by least squares")
    damp: float = Field(0.01, gt=0, description="ridge damping for the refit, relative to the mean Gram diagonal")
    selection: Literal["obs", "energy"] = Field(
        "obs", description="obs: remove the unit whose loss, after compensating the others, is smallest; energy: E[a^2]*||w||^2"
    )

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        import torch
        from transformers.pytorch_utils import prune_linear_layer

        if self.head_sparsity == 0 and self.ffn_sparsity == 0:
            raise StageError("prune.structured: head_sparsity and ffn_sparsity are both 0, so nothing would be pruned. Set one.")
        out = clone(artifact)
        model, config = out.model, out.model.config
        blocks = bert_blocks(model)
        if blocks is None:
            if gated_mlp_blocks(model) is None:
                raise unsupported(model)
            return self._run_gated(artifact, out, ctx)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        n_heads_cut = int(round(self.head_sparsity * heads))
        if n_heads_cut >= heads:
            n_heads_cut = heads - 1
            ctx.warn(f"prune.structured: head_sparsity={self.head_sparsity} would remove every head; keeping 1 per layer.")
        ffn = config.intermediate_size
        n_ffn_cut = self._ffn_cut(ffn)

        batches = calibration_batches(out, ctx.data.calibration[: self.samples])
        report: dict = {"params_before": count_params(model), "refit": self.refit}
        pruned_heads: dict[int, list[int]] = {}
        # Layer by layer, in order: each layer's statistics come from the model with the layers before
        # it already pruned, so a refit also absorbs the error coming from upstream.
        with torch.no_grad():
            for i, b in enumerate(blocks):
                if n_heads_cut:
                    o = b.attention.output.dense
                    g = _input_gram(model, o, batches)
                    groups = [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads)]
                    cut, new_w, new_b = _select(o, g, groups, n_heads_cut, self.selection, self.damp)
                    pruned_heads[i] = sorted(cut)
                    if self.refit:
                        o.weight.copy_(new_w)  # prune_heads drops the cut columns
                        o.bias.copy_(new_b)
                    model.prune_heads({i: pruned_heads[i]})  # shrinks q/k/v/o, records config.pruned_heads
                if n_ffn_cut:
                    down = b.output.dense
                    g = _input_gram(model, down, batches)
                    cut, new_w, new_b = _select(down, g, [[c] for c in range(ffn)], n_ffn_cut, self.selection, self.damp)
                    keep = torch.tensor(sorted(set(range(ffn)) - set(cut)))
                    b.intermediate.dense = prune_linear_layer(b.intermediate.dense, keep, dim=0)
                    if self.refit:
                        down.weight.copy_(new_w)
                        down.bias.copy_(new_b)
                    b.output.dense = prune_linear_layer(down, keep, dim=1)
        if n_ffn_cut:
            config.intermediate_size = ffn - n_ffn_cut  # uniform across layers, so the config stays true
        report.update(
            {
                "params_after": count_params(model),
                "heads_per_layer": heads - n_heads_cut,
                "intermediate_size": ffn - n_ffn_cut,
                "shapes.layer0.query": list(blocks[0].attention.self.query.weight.shape),
                "shapes.layer0.ffn_up": list(blocks[0].intermediate.dense.weight.shape),
            }
        )
        report["params_removed"] = round(1 - report["params_after"] / report["params_before"], 4)
        for i, hs in pruned_heads.items():
            report[f"pruned_heads.layer{i}"] = ",".join(map(str, hs))
        # the fit saw `batches`: measure on calibration texts it did not see, when there are any
        unseen = ctx.data.calibration[self.samples : self.samples + 128]
        if unseen:
            err = output_error(artifact.model, model, calibration_batches(out, unseen))
            report.update({k.replace("calibration.", "held_out."): v for k, v in err.items()})
        else:
            report.update({f"{k} (in-sample)": v for k, v in output_error(artifact.model, model, batches[:8]).items()})
        return StageResult(out, report)

    def _ffn_cut(self, ffn: int) -> int:
        """FFN channels to remove per layer; refuses a sparsity that would leave none."""
        n_cut = int(round(self.ffn_sparsity * ffn))
        if n_cut >= ffn:
            raise StageError(
                f"prune.structured: ffn_sparsity={self.ffn_sparsity} leaves no FFN channel of {ffn}. Use a value below 1."
            )
        return n_cut

    def _run_gated(self, artifact: TorchModel, out: TorchModel, ctx: Context) -> StageResult:
        """A Llama-style decoder: FFN channels only. A channel is a row of gate_proj and up_proj and a
        column of down_proj; down_proj (no bias) is refit on the kept channels. Heads are refused:
        with grouped-query attention a head can only go with its whole key/value group."""
        import torch
        from transformers.pytorch_utils import prune_linear_layer

        model, config = out.model, out.model.config
        if self.head_sparsity:
            raise StageError(
                f"prune.structured: head_sparsity on `{config.model_type}` is not supported: with grouped-query "
                "attention a head can only go with its whole key/value group. Set head_sparsity: 0 and use ffn_sparsity."
            )
        blocks = gated_mlp_blocks(model)
        ffn = config.intermediate_size
        n_cut = self._ffn_cut(ffn)
        batches = calibration_batches(out, ctx.data.calibration[: self.samples])
        report: dict = {"params_before": count_params(model), "refit": self.refit, "pruned": "FFN channels (gated MLP)"}
        with torch.no_grad():
            for b in blocks:  # in order: each layer compensates the error arriving from the pruned ones before it
                mlp = b.mlp
                g = _input_gram(model, mlp.down_proj, batches, constant=False)
                cut, new_w, _ = _select(mlp.down_proj, g, [[c] for c in range(ffn)], n_cut, self.selection, self.damp)
                keep = torch.tensor(sorted(set(range(ffn)) - set(cut)))
                mlp.gate_proj = prune_linear_layer(mlp.gate_proj, keep, dim=0)
                mlp.up_proj = prune_linear_layer(mlp.up_proj, keep, dim=0)
                if self.refit:
                    mlp.down_proj.weight.copy_(new_w)
                mlp.down_proj = prune_linear_layer(mlp.down_proj, keep, dim=1)
                mlp.intermediate_size = ffn - n_cut
        config.intermediate_size = ffn - n_cut
        report.update(
            {
                "params_after": count_params(model),
                "intermediate_size": ffn - n_cut,
                "shapes.layer0.gate_proj": list(blocks[0].mlp.gate_proj.weight.shape),
                "shapes.layer0.down_proj": list(blocks[0].mlp.down_proj.weight.shape),
            }
        )
        report["params_removed"] = round(1 - report["params_after"] / report["params_before"], 4)
        unseen = ctx.data.calibration[self.samples : self.samples + 64]
        check = calibration_batches(out, unseen) if unseen else batches[:8]
        err = output_error(artifact.model, model, check)
        where = "held_out." if unseen else "calibration.in_sample."
        report.update({k.replace("calibration.", where): v for k, v in err.items()})
        # pooled logits hide what matters to a language model: whether its next-token choice survives
        agree = []
        for batch in check:
            real = batch["attention_mask"].bool()
            a, p = forward(artifact.model, batch)[0], forward(model, batch)[0]
            agree.append((a.argmax(-1)[real] == p.argmax(-1)[real]).double())
        report[f"{where}top1_agreement"] = round(float(torch.cat(agree).mean()), 5)
        return StageResult(out, report)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been seen."""


def _input_gram(model, linear, batches, constant: bool = True):
    """Sum over real calibration tokens of [x 1]^T [x 1] (x x^T without ``constant``), x the input of
    ``linear`` (float64)."""

    state: dict = {"gram": 0}

    def hook(module, inputs, output):
        state["gram"] = state["gram"] + token_gram(inputs[0], state["mask"], constant=constant)
        raise _Stop

    handle = linear.register_forward_hook(hook)
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"]
            try:
                forward(model, batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return state["gram"]


def _select(linear, gram, groups: list[list[int]], n_cut: int, selection: str, damp: float):
    """Choose ``n_cut`` input groups (heads or channels) of ``linear`` to remove, and the weights and
    bias that let the rest reproduce the full output on the calibration inputs.

    ``obs`` is Optimal Brain Surgeon for whole groups: with H^-1 the inverse (damped) Gram of [x 1],
    removing group G costs tr(W_G [H^-1]_GG^-1 W_G^T) after the best compensation of all other
    weights, W -= W_G [H^-1]_GG^-1 [H^-1]_G:. The cheapest group goes first, then H^-1 is downdated
    and costs are recomputed. The end state is the least-squares refit on the kept inputs.
    ``energy`` ranks by E[a^2] * ||w||^2 once, then refits the kept inputs by least squares.
    Returns (cut group indices, weight with cut columns zeroed, bias). A Linear without a bias is fit
    without the constant input (``gram`` then has no constant row) and returns bias None.
    """
    import torch

    if linear.bias is None:  # no constant input: append a dead one so the code below is shared
        gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))
        gram[-1, -1] = 1.0
        w = torch.cat([linear.weight.double(), torch.zeros(linear.weight.shape[0], 1, dtype=torch.float64)], 1)
    else:
        w = torch.cat([linear.weight.double(), linear.bias.double()[:, None]], 1)  # (out, in + 1)
    n_in = gram.shape[0] - 1  # the last row/column is the constant input that carries the bias
    h = gram + damp * gram.diagonal()[:-1].mean() * torch.eye(n_in + 1, dtype=gram.dtype)
    alive = list(range(len(groups)))
    cut: list[int] = []
    if selection == "energy":
        energy = gram.diagonal()[:-1] * w[:, :-1].pow(2).sum(0)
        score = torch.stack([energy[g].sum() for g in groups])
        cut = torch.topk(score, n_cut, largest=False).indices.tolist()
        keep = torch.tensor(sorted({c for i, g in enumerate(groups) if i not in cut for c in g}) + [n_in])
        solved = torch.linalg.solve(h[keep][:, keep], h[keep] @ w.T).T  # ridge least squares on kept inputs
        w = torch.zeros_like(w)
        w[:, keep] = solved
    else:
        hinv = torch.linalg.inv(h)
        single = all(len(g) == 1 for g in groups)
        group_of = {g[0]: i for i, g in enumerate(groups)} if single else {}
        removed = torch.ones(n_in + 1, dtype=torch.bool)  # only group members are candidates; never the bias column
        removed[[c for g in groups for c in g]] = False
        for _ in range(n_cut):
            if single:  # vectorized: cost_c = ||W[:, c]||^2 / [H^-1]_cc
                cost = w.pow(2).sum(0) / hinv.diagonal().clamp_min(1e-30)
                cost[removed] = float("inf")
                c = int(cost.argmin())
                best, g = group_of[c], [c]
            else:
                costs = [
                    torch.einsum("og,gk,ok->", w[:, groups[i]], torch.linalg.inv(hinv[groups[i]][:, groups[i]]), w[:, groups[i]])
                    for i in alive
                ]
                best = alive[int(torch.stack(costs).argmin())]
                g = groups[best]
            block = torch.linalg.inv(hinv[g][:, g])
            w -= w[:, g] @ block @ hinv[g]  # compensate the remaining weights
            hinv -= hinv[:, g] @ block @ hinv[g]  # H^-1 of the problem without group g
            w[:, g] = 0
            removed[g] = True
            alive.remove(best)
            cut.append(best)
    bias = None if linear.bias is None else w[:, -1].to(linear.bias.dtype)
    return cut, w[:, :-1].to(linear.weight.dtype), bias
