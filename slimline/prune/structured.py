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
kept units plus a bias reproduce the full layer's output. For encoders the refit's target is, by
default, the original model's residual stream at that point (``refit_target: original``), so each layer
also corrects the error carried in from the pruned layers before it. FFN channels go in the same
fraction from every layer, so the config's one ``intermediate_size`` stays true; heads may go unevenly
(``head_allocation: sensitivity``: fewer from the layers where the measured cost is high), which
``pruned_heads`` records per layer. docs/prune.md has the measured effect of each choice.

Llama-style decoders (gated MLP, grouped-query attention) lose FFN channels (rows of gate/up, columns
of down) and query heads. Query heads share key/value heads, so ``gqa_heads`` says how they go: the
same number from every key/value group (``num_attention_heads`` shrinks, the KV cache stays), or
whole groups (``num_key_value_heads`` shrinks too, and with it the KV cache). docs/llm.md has SmolLM2's figures.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_batches
from slimline.models.modules import forward
from slimline.prune.common import (
    clone,
    count_params,
    next_token_fidelity,
    output_error,
    token_gram,
)
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
        "and FFN channels; Llama-style decoders with a gated MLP: heads and FFN channels). Use prune.magnitude or "
        "prune.wanda instead."
    )


class Structured(Stage):
    """Remove the least important heads and FFN channels of every layer."""

    kind = "prune.structured"
    reshapes = True
    consumes = (TorchModel,)

    head_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed per layer")
    ffn_sparsity: float = Field(0.0, ge=0, lt=1, description="fraction of FFN intermediate channels removed per layer")
    samples: int = Field(
        4000, ge=1, le=1_000_000, description="calibration texts used to score and refit (more generalizes better)"
    )
    refit: bool = Field(True, description="refit the projections that read pruned units by least squares")
    damp: float = Field(0.01, gt=0, description="ridge damping for the refit, relative to the mean Gram diagonal")
    gqa_heads: Literal["per_group", "whole_groups"] = Field(
        "per_group",
        description="decoders with grouped-query attention: per_group removes the same number of query heads from every "
        "key/value group (the KV cache keeps its size); whole_groups removes whole key/value groups with their query heads "
        "(the KV cache shrinks too)",
    )
    selection: Literal["obs", "energy"] = Field(
        "obs", description="obs: remove the unit whose loss, after compensating the others, is smallest; energy: E[a^2]*||w||^2"
    )
    head_allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform",
        description="uniform: head_sparsity of every layer's heads; sensitivity (encoders): the same total, spread over the "
        "layers by the measured cost of removing heads from each one alone (sensitive layers keep more)",
    )
    refit_target: Literal["auto", "original", "layer"] = Field(
        "auto",
        description="original (encoders): refit every layer's output projections so its residual stream matches the "
        "original model's, which also corrects the error arriving from earlier pruned layers; layer: reproduce the "
        "layer's own unpruned output from its already-perturbed inputs; auto: original for encoders, layer for decoders",
    )

    @model_validator(mode="after")
    def _options(self) -> Structured:
        if self.head_sparsity == 0 and self.ffn_sparsity == 0:
            raise ValueError("prune.structured: head_sparsity and ffn_sparsity are both 0, so nothing would be pruned. Set one.")
        if self.refit_target == "original" and not self.refit:
            raise ValueError("prune.structured: refit_target: original needs refit: true (it is a kind of refit).")
        return self

    def check_model(self, reference: TorchModel) -> None:
        """The architecture, and the head and channel arithmetic against the model's config."""
        model, config = reference.model, reference.model.config
        if bert_blocks(model) is None:
            if gated_mlp_blocks(model) is None:
                raise unsupported(model)
            self._check_gated(config)
            if self.head_sparsity:
                self._gqa_plan(config)
        if self.ffn_sparsity:
            self._ffn_cut(config.intermediate_size)

    def _check_gated(self, config: Any) -> None:
        why = {
            ("head_allocation", "sensitivity"): "keeps the same head count in every layer (its config has one)",
            ("refit_target", "original"): "adds its residuals outside any module slimline can hook, so only `layer` is built",
        }
        for (name, value), reason in why.items():
            if getattr(self, name) == value:
                raise StageError(
                    f"prune.structured: {name}: {value} is for BERT-family encoders; `{config.model_type}` {reason}. "
                    f"Leave {name} out."
                )

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        import torch
        from transformers.pytorch_utils import prune_linear_layer

        out = clone(artifact)
        model, config = out.model, out.model.config
        blocks = bert_blocks(model)
        if blocks is None:
            if gated_mlp_blocks(model) is None:
                raise unsupported(model)
            return self._run_gated(artifact, out, ctx)
        if self.gqa_heads != "per_group":
            ctx.warn(f"prune.structured: gqa_heads has no effect on `{config.model_type}`, which has no grouped-query attention.")
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        n_heads_cut = int(round(self.head_sparsity * heads))
        if n_heads_cut >= heads:
            n_heads_cut = heads - 1
            ctx.warn(f"prune.structured: head_sparsity={self.head_sparsity} would remove every head; keeping 1 per layer.")
        ffn = config.intermediate_size
        n_ffn_cut = self._ffn_cut(ffn)
        compensate = self.refit and self.refit_target in ("auto", "original")

        batches = calibration_batches(out.tokenizer, ctx.data.calibration[: self.samples])
        unseen = ctx.data.calibration[self.samples : self.samples + 128]
        report: dict = {"params_before": count_params(model), "refit": self.refit}
        report["refit_target"] = "original" if compensate else "layer" if self.refit else "none"
        groups = [list(range(h * head_dim, (h + 1) * head_dim)) for h in range(heads)]
        heads_cut = [n_heads_cut] * len(blocks)
        total = int(round(self.head_sparsity * heads * len(blocks)))
        if total and self.head_allocation == "sensitivity":  # a total, so 1 of 72 heads is possible too
            check = calibration_batches(out.tokenizer, unseen) if unseen else batches[:8]
            heads_cut, costs = self._allocate_heads(model, blocks, groups, batches[:64], check, total)
            report["head_allocation"] = "sensitivity"
            for i, c in enumerate(costs):  # the measured cost of each layer's cut, alone, as 1 - cosine
                report[f"head_cost.layer{i}"] = round(c, 5)
        original = artifact.model
        originals = bert_blocks(original)
        pruned_heads: dict[int, list[int]] = {}
        # Layer by layer, in order: each layer's statistics come from the model with the layers before
        # it already pruned, so a refit also absorbs the error coming from upstream.
        with torch.no_grad():
            for i, b in enumerate(blocks):
                if heads_cut[i]:
                    o = b.attention.output.dense
                    g = _input_gram(model, o, batches)
                    cut, new_w, new_b = _select(o, g, groups, heads_cut[i], self.selection, self.damp)
                    pruned_heads[i] = sorted(cut)
                    if self.refit:
                        o.weight.copy_(new_w)  # prune_heads drops the cut columns
                        o.bias.copy_(new_b)
                    model.prune_heads({i: pruned_heads[i]})  # shrinks q/k/v/o, records config.pruned_heads
                if compensate:
                    _refit_to_original(model, b.attention.output, original, originals[i].attention.output, batches, self.damp)
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
                if compensate:
                    _refit_to_original(model, b.output, original, originals[i].output, batches, self.damp)
        if n_ffn_cut:
            config.intermediate_size = ffn - n_ffn_cut  # uniform across layers, so the config stays true
        kept = [heads - c for c in heads_cut]
        report.update(
            {
                "params_after": count_params(model),
                "heads_per_layer": kept[0] if len(set(kept)) == 1 else ",".join(map(str, kept)),
                "intermediate_size": ffn - n_ffn_cut,
                "shapes.layer0.query": list(blocks[0].attention.self.query.weight.shape),
                "shapes.layer0.ffn_up": list(blocks[0].intermediate.dense.weight.shape),
            }
        )
        report["params_removed"] = round(1 - report["params_after"] / report["params_before"], 4)
        for i, hs in pruned_heads.items():
            report[f"pruned_heads.layer{i}"] = ",".join(map(str, hs))
        # the fit saw `batches`: measure on calibration texts it did not see, when there are any
        if unseen:
            err = output_error(artifact.model, model, calibration_batches(out.tokenizer, unseen))
            report.update({k.replace("calibration.", "held_out."): v for k, v in err.items()})
        else:
            report.update({f"{k} (in-sample)": v for k, v in output_error(artifact.model, model, batches[:8]).items()})
        return StageResult(out, report)

    def _allocate_heads(self, model, blocks, groups, fit, check, total: int) -> tuple[list[int], list[float]]:
        """Spread ``total`` head cuts over the layers (``head_allocation: sensitivity``).

        For each layer alone, the cost of removing k of its heads (chosen and compensated as the real
        cut would be) is measured as 1 - the model's mean output cosine on ``check``. Then cuts go one at
        a time to the layer whose next cut costs least. Every layer keeps at least one head. Returns the
        cuts per layer and each layer's cost at its cut."""
        import math

        import torch

        heads = len(groups)
        limit = min(heads - 1, 2 * math.ceil(total / len(blocks)) + 1)  # the most any layer is tried with
        reference = _pooled(model, check)
        costs: list[list[float]] = []
        with torch.no_grad():
            for b in blocks:
                o = b.attention.output.dense
                g = _input_gram(model, o, fit)
                w0, b0 = o.weight.clone(), o.bias.clone()
                layer = [0.0]
                for k in range(1, limit + 1):  # zeroed columns compute exactly what the pruned layer would
                    _, new_w, new_b = _select(o, g, groups, k, self.selection, self.damp)
                    o.weight.copy_(new_w)
                    o.bias.copy_(new_b)
                    layer.append(1 - float((_pooled(model, check) * reference).sum(-1).mean()))
                o.weight.copy_(w0)
                o.bias.copy_(b0)
                costs.append(layer)
        cuts = [0] * len(blocks)
        for _ in range(min(total, limit * len(blocks))):
            i = min((i for i in range(len(blocks)) if cuts[i] < limit), key=lambda i: costs[i][cuts[i] + 1] - costs[i][cuts[i]])
            cuts[i] += 1
        return cuts, [costs[i][c] for i, c in enumerate(cuts)]

    def _ffn_cut(self, ffn: int) -> int:
        """FFN channels to remove per layer; refuses a sparsity that would leave none."""
        n_cut = int(round(self.ffn_sparsity * ffn))
        if n_cut >= ffn:
            raise StageError(
                f"prune.structured: ffn_sparsity={self.ffn_sparsity} leaves no FFN channel of {ffn}. Use a value below 1."
            )
        return n_cut

    def _run_gated(self, artifact: TorchModel, out: TorchModel, ctx: Context) -> StageResult:
        """A Llama-style decoder. Heads: under grouped-query attention query heads share key/value heads,
        so ``gqa_heads`` says how they go (see the field). FFN channels: a channel is a row of gate_proj
        and up_proj and a column of down_proj. o_proj and down_proj (no bias) are refit on what is kept."""
        import torch
        from transformers.pytorch_utils import prune_linear_layer

        model, config = out.model, out.model.config
        self._check_gated(config)
        blocks = gated_mlp_blocks(model)
        ffn = config.intermediate_size
        n_cut = self._ffn_cut(ffn) if self.ffn_sparsity else 0
        plan = self._gqa_plan(config) if self.head_sparsity else None
        batches = calibration_batches(out.tokenizer, ctx.data.calibration[: self.samples])
        pruned = []
        if plan:
            pruned.append("query heads per key/value group" if plan["per_group"] else "key/value groups")
        if n_cut:
            pruned.append("FFN channels (gated MLP)")
        report: dict = {"params_before": count_params(model), "refit": self.refit, "pruned": ", ".join(pruned)}
        with torch.no_grad():
            for i, b in enumerate(blocks):  # in order: each layer compensates the error arriving from the pruned ones before it
                if plan:
                    report[f"pruned_heads.layer{i}"] = ",".join(map(str, self._cut_heads(model, b.self_attn, batches, plan)))
                if n_cut:
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
        config.intermediate_size = ffn - n_cut  # uniform across layers, so the config stays true
        if plan:
            config.num_attention_heads, config.num_key_value_heads = plan["heads"], plan["kv_heads"]
            report.update({"heads_per_layer": plan["heads"], "kv_heads_per_layer": plan["kv_heads"]})
        report.update(
            {
                "params_after": count_params(model),
                "intermediate_size": ffn - n_cut,
                "shapes.layer0.q_proj": list(blocks[0].self_attn.q_proj.weight.shape),
                "shapes.layer0.k_proj": list(blocks[0].self_attn.k_proj.weight.shape),
                "shapes.layer0.gate_proj": list(blocks[0].mlp.gate_proj.weight.shape),
                "shapes.layer0.down_proj": list(blocks[0].mlp.down_proj.weight.shape),
            }
        )
        report["params_removed"] = round(1 - report["params_after"] / report["params_before"], 4)
        unseen = ctx.data.calibration[self.samples : self.samples + 64]
        check = calibration_batches(out.tokenizer, unseen) if unseen else batches[:8]
        err = output_error(artifact.model, model, check)
        where = "held_out." if unseen else "calibration.in_sample."
        report.update({k.replace("calibration.", where): v for k, v in err.items()})
        # pooled logits hide what matters to a language model: whether its next-token choice survives
        report.update({where + k: v for k, v in next_token_fidelity(artifact.model, model, check).items()})
        return StageResult(out, report)

    def _gqa_plan(self, config) -> dict:
        """How many heads go, and from where, under grouped-query attention (``gqa_heads``)."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        rep = heads // kv  # query heads per key/value head; head h reads key/value head h // rep
        if self.gqa_heads == "per_group":
            cut = int(round(self.head_sparsity * rep))
            if cut == 0:
                raise StageError(
                    f"prune.structured: head_sparsity={self.head_sparsity} removes no query head: `{config.model_type}` has "
                    f"{rep} per key/value group, and per_group removes the same number from each. Raise head_sparsity to "
                    f"{1 / rep:.2f} or more, or set gqa_heads: whole_groups."
                )
            if rep - cut < 2:
                raise StageError(
                    f"prune.structured: head_sparsity={self.head_sparsity} would leave {rep - cut} query head per key/value "
                    f"group (of {rep}). Grouped-query attention needs 2 or more to stay grouped (the GroupQueryAttention "
                    "fusion matches the K/V expansion), so keep at least 2 per group, or set gqa_heads: whole_groups."
                )
            return {"per_group": True, "rep": rep, "kv": kv, "cut": cut, "heads": (rep - cut) * kv, "kv_heads": kv}
        cut = int(round(self.head_sparsity * kv))
        if cut == 0:
            raise StageError(
                f"prune.structured: head_sparsity={self.head_sparsity} removes no key/value group of {kv}. Raise it to "
                f"{1 / kv:.2f} or more, or set gqa_heads: per_group."
            )
        if cut >= kv:
            raise StageError(
                f"prune.structured: head_sparsity={self.head_sparsity} would remove all {kv} key/value groups. Use a value "
                f"that keeps at least one ({(kv - 1) / kv:.2f} or less)."
            )
        return {"per_group": False, "rep": rep, "kv": kv, "cut": cut, "heads": rep * (kv - cut), "kv_heads": kv - cut}

    def _cut_heads(self, model, attn, batches, plan: dict) -> list[int]:
        """Remove one layer's query heads (and with whole groups its key/value heads): OBS on o_proj's
        input Gram, o_proj refit on the kept heads. Returns the removed query heads."""
        import torch
        from transformers.pytorch_utils import prune_linear_layer

        o, dim, rep = attn.o_proj, attn.head_dim, plan["rep"]
        g = _input_gram(model, o, batches, constant=o.bias is not None)
        if plan["per_group"]:  # one group per query head; each key/value group gives up the same number
            groups = [list(range(h * dim, (h + 1) * dim)) for h in range(rep * plan["kv"])]
            buckets = [h // rep for h in range(len(groups))]
            cut, new_w, new_b = _select(o, g, groups, plan["cut"] * plan["kv"], self.selection, self.damp, buckets, plan["cut"])
            gone = sorted(cut)
        else:  # one group per key/value head: the query heads that read it
            groups = [list(range(j * rep * dim, (j + 1) * rep * dim)) for j in range(plan["kv"])]
            cut, new_w, new_b = _select(o, g, groups, plan["cut"], self.selection, self.damp)
            gone = sorted(h for j in cut for h in range(j * rep, (j + 1) * rep))
            kv_keep = torch.tensor([c for j in range(plan["kv"]) if j not in cut for c in range(j * dim, (j + 1) * dim)])
            attn.k_proj = prune_linear_layer(attn.k_proj, kv_keep, dim=0)
            attn.v_proj = prune_linear_layer(attn.v_proj, kv_keep, dim=0)
        keep = torch.tensor([c for h in range(rep * plan["kv"]) if h not in gone for c in range(h * dim, (h + 1) * dim)])
        if self.refit:
            o.weight.copy_(new_w)
            if o.bias is not None:
                o.bias.copy_(new_b)
        attn.q_proj = prune_linear_layer(attn.q_proj, keep, dim=0)
        attn.o_proj = prune_linear_layer(o, keep, dim=1)
        attn.num_key_value_groups = plan["heads"] // plan["kv_heads"]
        return gone


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


def _select(
    linear,
    gram,
    groups: list[list[int]],
    n_cut: int,
    selection: str,
    damp: float,
    buckets: list[int] | None = None,
    per_bucket: int = 0,
):
    """Choose ``n_cut`` input groups (heads or channels) of ``linear`` to remove, and the weights and
    bias that let the rest reproduce the full output on the calibration inputs.

    ``obs`` is Optimal Brain Surgeon for whole groups: with H^-1 the inverse (damped) Gram of [x 1],
    removing group G costs tr(W_G [H^-1]_GG^-1 W_G^T) after the best compensation of all other
    weights, W -= W_G [H^-1]_GG^-1 [H^-1]_G:. The cheapest group goes first, then H^-1 is downdated
    and costs are recomputed. The end state is the least-squares refit on the kept inputs.
    ``energy`` ranks by E[a^2] * ||w||^2 once, then refits the kept inputs by least squares.
    With ``buckets`` (a bucket per group), no more than ``per_bucket`` groups go from any one bucket
    (query heads of one key/value group under grouped-query attention).
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

    def open_(i: int) -> bool:  # whether group i may still go, under the per-bucket quota
        return buckets is None or sum(buckets[c] == buckets[i] for c in cut) < per_bucket

    if selection == "energy":
        energy = gram.diagonal()[:-1] * w[:, :-1].pow(2).sum(0)
        score = torch.stack([energy[g].sum() for g in groups])
        for i in torch.argsort(score).tolist():
            if len(cut) < n_cut and open_(i):
                cut.append(i)
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
                candidates = [i for i in alive if open_(i)]
                costs = [
                    torch.einsum("og,gk,ok->", w[:, groups[i]], torch.linalg.inv(hinv[groups[i]][:, groups[i]]), w[:, groups[i]])
                    for i in candidates
                ]
                best = candidates[int(torch.stack(costs).argmin())]
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


def _pooled(model, batches):
    """Unit-length mean-pooled outputs of ``model`` over real tokens, all batches stacked."""
    import torch

    out = []
    for batch in batches:
        h = forward(model, batch)[0].double()
        m = batch["attention_mask"][..., None].double()
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def _refit_to_original(model, module, original, original_module, batches, damp: float) -> None:
    """Refit ``module.dense`` (a BertSelfOutput / BertOutput: LayerNorm(dense(a) + x)) so that
    dense(a) + x, with a and x from the pruned ``model``, matches the same sum in ``original``: ridge
    least squares of [a 1] onto (original's dense(a') + x') - x over real calibration tokens. The layer then
    also corrects the error carried in by earlier pruned layers, not only its own."""
    import torch

    state: dict = {}

    def grab(key, original_side):
        def hook(mod, inputs, output):
            a, x = inputs[0], inputs[1]
            real = state["mask"].bool()
            state[key] = ((mod.dense(a) + x) if original_side else torch.cat([a, x], -1))[real].double()
            raise _Stop

        return hook

    h = c = 0
    handles = [module.register_forward_hook(grab("pruned", False)), original_module.register_forward_hook(grab("original", True))]
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"]
            for m in (model, original):
                try:
                    forward(m, batch)
                except _Stop:
                    pass
            n = module.dense.in_features
            a, x = state["pruned"][:, :n], state["pruned"][:, n:]
            a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
            h = h + a.T @ a
            c = c + a.T @ (state["original"] - x)
    finally:
        for handle in handles:
            handle.remove()
    # Ridge toward the weights the layer has now, not toward zero: a layer whose inputs carry no error
    # keeps its trained weights, instead of trading them for a fit to the calibration text.
    lam = damp * h.diagonal()[:-1].mean()
    w0 = torch.cat([module.dense.weight, module.dense.bias[:, None]], 1).double()
    w = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype), c + lam * w0.T).T
    module.dense.weight.copy_(w[:, :-1].to(module.dense.weight.dtype))
    module.dense.bias.copy_(w[:, -1].to(module.dense.bias.dtype))
