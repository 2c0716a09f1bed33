"""``slimline mixed RECIPE --sensitivity DIR``: each layer's format chosen under the recipe's budget,
from measured sensitivities, then built and measured.

For a decoder recipe with ``quantize.weight_only`` each layer takes one of the measured weight
formats (``int4-32``, ``int8-64``, ...): a multiple-choice knapsack picks the formats with the least
summed KL divergence (``slimline sensitivity``'s per-layer figure) whose stored bytes are no more
than the recipe's own formats take (``--max-weight-mb`` sets another bound). Fewer weight bytes is
also what batch-1 decode reads per token, so the choice can only trade bytes between layers, never
add them. The chosen formats go into ``quantize.weight_only.layers`` and the point is built and
measured once; the report compares its measured perplexity, size and speed with nothing estimated.

For a recipe whose quantizer is ``quantize.dynamic_int8`` or ``quantize.static_int8`` each layer is
int8 or float (its ``exclude``), by the sensitivity's ``int8`` or ``int8-static`` figures. The
choice is a 0/1 knapsack: keep as many weight bytes in int8 as possible while the
sum of the layers' measured mean-cosine drops (``slimline sensitivity``) stays within the recipe's
``max_fidelity_drop``, less what the float graph already loses. Summing drops is an estimate (layer
errors are not exactly additive), so the chosen point is then built and measured by a real run; if
the measured drop breaks the budget, the estimate's budget is scaled by estimate/measured and the
choice made again, up to ``rounds`` times. Only measured figures are reported as results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from slimline import api
from slimline.errors import OutputError, RecipeError

Log = Callable[[str], None]
STEP = 1e-6  # knapsack resolution of the cosine drops
INT8_FORMATS = {"quantize.dynamic_int8": "int8", "quantize.static_int8": "int8-static"}  # quantizer -> its sensitivity format


def knapsack(items: list[tuple[str, float, int]], budget: float) -> set[str]:
    """The names to quantize: maximal total bytes with the summed drops within ``budget``.
    ``items``: (name, drop, bytes). A layer whose drop is <= 0 costs nothing."""
    cap = max(int(budget / STEP), 0)
    free = {n for n, d, _ in items if d <= 0}
    costly = [(n, int(round(d / STEP)), b) for n, d, b in items if d > 0]
    best = [0] * (cap + 1)
    keep = [[False] * (cap + 1) for _ in costly]
    for i, (_, c, b) in enumerate(costly):
        for w in range(cap, c - 1, -1):
            if best[w - c] + b > best[w]:
                best[w], keep[i][w] = best[w - c] + b, True
    chosen, w = set(free), cap
    for i in range(len(costly) - 1, -1, -1):
        if keep[i][w]:
            chosen.add(costly[i][0])
            w -= costly[i][1]
    return chosen


def choose_formats(
    options: dict[str, dict[str, tuple[float, int]]], budget: int, cells: int = 2_000_000
) -> dict[str, str] | None:
    """One format per layer with the least summed cost and total bytes within ``budget``: a multiple-choice
    knapsack by dynamic programming over bytes. ``options``: layer -> {format: (cost, bytes)}. None when even
    the smallest formats don't fit.

    The grid is the sizes' greatest common divisor, so the answer is exact; when that would take more than
    ``cells`` cells the grid is coarser, sizes are rounded to it, and the grid's bound is lowered until the
    true bytes fit."""
    sizes = [b for formats in options.values() for _, b in formats.values()]
    unit = max(math.gcd(*sizes) if sizes else 1, 1)
    if budget // unit > cells:
        unit = math.ceil(budget / cells)
    cap = budget // unit
    while cap >= 0:
        chosen = _knapsack_grid(options, cap, unit)
        if chosen is None or sum(options[n][f][1] for n, f in chosen.items()) <= budget:
            return chosen
        cap -= max(1, len(options) // 4)  # rounding overshot: tighten the grid's bound
    return None


def _knapsack_grid(options: dict[str, dict[str, tuple[float, int]]], cap: int, unit: int) -> dict[str, str] | None:
    best = np.full(cap + 1, np.inf)  # best[c]: least cost so far using exactly c cells
    best[0] = 0.0
    picks = []
    for name, formats in options.items():
        names = list(formats)
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for j, fmt in enumerate(names):
            cost, size = formats[fmt]
            c = round(size / unit)
            if c > cap:
                continue
            shifted = np.full(cap + 1, np.inf)
            shifted[c:] = best[: cap + 1 - c] + cost
            better = shifted < new
            new[better], arg[better] = shifted[better], j
        best = new
        picks.append((name, names, arg))
    if not np.isfinite(best).any():
        return None
    used = int(np.argmin(best))
    chosen = {}
    for name, names, arg in reversed(picks):
        fmt = names[int(arg[used])]
        chosen[name] = fmt
        used -= round(options[name][fmt][1] / unit)
    return chosen


def read_sensitivity(sensitivity_dir: Path, recipe_name: str) -> dict[str, Any]:
    try:
        sens = json.loads((sensitivity_dir / "sensitivity.json").read_text())
    except (OSError, ValueError):
        raise RecipeError(
            f"--sensitivity {sensitivity_dir}: no readable sensitivity.json; run `slimline sensitivity {recipe_name} --out DIR` first."
        ) from None
    if sens.get("recipe") != recipe_name:
        raise RecipeError(f"--sensitivity {sensitivity_dir}: measured for recipe {sens.get('recipe')}, not {recipe_name}.")
    return sens


def mixed(
    recipe_ref: str | Path,
    sensitivity_dir: Path,
    out: Path,
    *,
    model: str | None = None,
    task: str | None = None,
    rounds: int = 3,
    max_weight_mb: float | None = None,
    log: Log = print,
) -> dict[str, Any]:
    _, recipe = api.load_recipe(recipe_ref, (), model, task)
    raw = recipe.model_dump(mode="json")
    index = next((i for i, s in enumerate(raw["stages"]) if any(k in s for k in INT8_FORMATS)), None)
    weight_only = next((i for i, s in enumerate(raw["stages"]) if "quantize.weight_only" in s), None)
    if index is None and weight_only is not None:
        sens = read_sensitivity(sensitivity_dir, recipe.name)
        if out.exists():
            raise OutputError(f"--out {out}: exists; choose a new folder.")
        return mixed_weight_only(recipe, raw, weight_only, sens, sensitivity_dir, out, max_weight_mb, log)
    if index is None:
        raise RecipeError(
            f"mixed: {recipe.name} has no quantize.dynamic_int8 or quantize.static_int8 (each layer int8 or float) and no "
            "quantize.weight_only (each layer's bits and block size); mixed precision chooses formats for those quantizers."
        )
    budget = recipe.evaluate.budgets.max_fidelity_drop
    if budget is None:
        raise RecipeError(f"mixed: {recipe.name} has no evaluate.budgets.max_fidelity_drop to choose under; add one.")
    sens = read_sensitivity(sensitivity_dir, recipe.name)
    if out.exists():
        raise OutputError(f"--out {out}: exists; choose a new folder.")
    kind = next(k for k in raw["stages"][index] if k in INT8_FORMATS)
    fmt = INT8_FORMATS[kind]
    rows = [r for r in sens["rows"] if r["format"] == fmt]
    if not rows:
        raise RecipeError(
            f"--sensitivity {sensitivity_dir}: has no {fmt} measurements ({kind}); run it with {fmt} among --formats."
        )
    base_loss = 1.0 - float(sens["float_mean_cosine"])
    items = [(r["node"], float(r["cosine_drop"]), int(r.get("weight_bytes", 1))) for r in rows]
    label = {
        r["node"]: (f"role:{r['role']}" if r["role"] and not r["role"].startswith("attention.fused") else r["node"]) for r in rows
    }
    drop = {r["node"]: float(r["cosine_drop"]) for r in rows}
    allowed = budget - base_loss
    out.mkdir(parents=True)
    attempts = []
    chosen: set[str] = set()
    for attempt in range(1, rounds + 1):
        chosen = knapsack(items, allowed)
        kept = sorted(set(drop) - chosen, key=lambda n: -drop[n])
        estimate = base_loss + sum(drop[n] for n in chosen)
        stage = dict(raw["stages"][index][kind])
        stage["exclude"] = sorted({*stage.get("exclude", []), *(label[n] for n in kept)})
        stage["fallback"] = "none"  # the choice is this one, measured; no second selection behind it
        trial = json.loads(json.dumps(raw))
        trial["stages"][index] = {kind: stage}
        trial["name"] = f"{recipe.name}-mixed"
        log(f"mixed: round {attempt}: {len(chosen)} of {len(drop)} layers int8, {len(kept)} float; estimated drop {estimate:.5f}")
        result = api.run(trial, out=out / f"round-{attempt}", reporter=None)
        summary = next(iter(result.report["summary"].values()))
        measured = float(summary["fidelity_drop"])
        attempts.append(
            {
                "round": attempt,
                "int8": len(chosen),
                "float": kept,
                "estimated_drop": round(estimate, 6),
                "measured_drop": measured,
                "passed": result.passed,
                "speedup": summary.get("speedup"),
                "size_mb": summary.get("size_mb"),
                "folder": str(result.folder),
            }
        )
        log(
            f"mixed: round {attempt}: measured drop {measured:.5f} (estimate {estimate:.5f}); {'meets' if result.passed else 'breaks'} the budgets"
        )
        if measured <= budget:
            header = [
                f"# Chosen by `slimline mixed` from {sensitivity_dir}/sensitivity.json under max_fidelity_drop {budget}:",
                f"# {len(chosen)} of {len(drop)} layers in int8; kept in float (measured drop when each alone is int8):",
                *(f"#   {label[n]}: {drop[n]:+.5f}" for n in kept),
                f"# Estimated drop {estimate:.5f}; measured {measured:.5f} in {result.folder}.",
            ]
            (out / "mixed.yaml").write_text("\n".join(header) + "\n" + yaml.safe_dump(trial, sort_keys=False))
            if not result.passed:
                log("mixed: the fidelity budget holds but another budget does not (see the run's report.md)")
            break
        # the estimate was optimistic: shrink its budget by how far it was off, then choose again
        over = measured - base_loss
        allowed = allowed * max(estimate - base_loss, STEP) / max(over, STEP) * 0.95
    summary_out = {
        "recipe": recipe.name,
        "budget": budget,
        "attempts": attempts,
        "chosen": sorted(chosen) if attempts[-1]["measured_drop"] <= budget else None,
    }
    (out / "mixed.json").write_text(json.dumps(summary_out, indent=2))
    return summary_out


def mixed_weight_only(
    recipe: Any,
    raw: dict,
    index: int,
    sens: dict,
    sensitivity_dir: Path,
    out: Path,
    max_weight_mb: float | None,
    log: Log,
) -> dict[str, Any]:
    """Each weight-only layer's bits and block size from the measured KL, bytes bounded; built and measured once."""
    from slimline.search.sensitivity import weight_format

    stage = recipe.stages[index]
    rows = [r for r in sens["rows"] if weight_format(r["format"]) and r.get("kl") is not None]
    if sens.get("metric") != "kl" or not rows:
        raise RecipeError(
            f"--sensitivity {sensitivity_dir}: has no weight-only (int4-N, int8-N) KL measurements; run "
            f"`slimline sensitivity {recipe.name} --out DIR` on this decoder recipe."
        )
    options: dict[str, dict[str, tuple[float, int]]] = {}
    role: dict[str, str] = {}
    for r in rows:
        options.setdefault(r["node"], {})[r["format"]] = (float(r["kl"]), int(r["weight_bytes"]))
        role[r["node"]] = r["role"]

    def own(node: str) -> str:
        bits = (stage.head_bits or stage.bits) if role[node] == "lm_head" else stage.bits
        return f"int{bits}-{stage.block_for(bits)}"

    default = {n: own(n) for n in options}
    missing = sorted(n for n in options if default[n] not in options[n])
    if missing:
        raise RecipeError(
            f"--sensitivity {sensitivity_dir}: {missing[0]} was not measured in the recipe's own format {default[missing[0]]}; "
            "include that format in `slimline sensitivity --formats`."
        )
    own_bytes = sum(options[n][default[n]][1] for n in options)
    budget = int(max_weight_mb * 2**20) if max_weight_mb else own_bytes
    chosen = choose_formats(options, budget)
    if chosen is None:
        raise RecipeError(f"mixed: no choice of the measured formats fits {budget / 2**20:.1f} MB of layer weights; raise it.")
    estimate = {
        "recipe_kl": sum(options[n][default[n]][0] for n in options),
        "chosen_kl": sum(options[n][chosen[n]][0] for n in options),
        "recipe_weight_mb": round(own_bytes / 2**20, 3),
        "chosen_weight_mb": round(sum(options[n][chosen[n]][1] for n in options) / 2**20, 3),
    }
    changed = {n: f for n, f in chosen.items() if f != default[n]}
    label = {n: f"role:{role[n]}" if role[n] and role[n] != "lm_head" else n for n in options}
    stage_raw = dict(raw["stages"][index]["quantize.weight_only"])
    layers = dict(stage_raw.get("layers") or {})
    for n, fmt in sorted(changed.items(), key=lambda kv: label[kv[0]]):
        bits, block = weight_format(fmt)
        layers[label[n]] = {"bits": bits, "block_size": block}
    stage_raw["layers"] = layers
    stage_raw["fallback"] = "none"  # every layer's format is this measured choice; no second selection behind it
    trial = json.loads(json.dumps(raw))
    trial["stages"][index] = {"quantize.weight_only": stage_raw}
    trial["name"] = f"{recipe.name}-mixed"
    counts: dict[str, int] = {}
    for f in chosen.values():
        counts[f] = counts.get(f, 0) + 1
    log(
        f"mixed: {len(changed)} of {len(options)} layers change format ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}); "
        f"layer weights {estimate['chosen_weight_mb']} MB against the recipe's {estimate['recipe_weight_mb']} MB; "
        f"summed KL {estimate['chosen_kl'] * 1e3:.3f}e-3 against {estimate['recipe_kl'] * 1e3:.3f}e-3"
    )
    out.mkdir(parents=True)
    result = api.run(trial, out=out / "round-1", reporter=None)
    summary = next(iter(result.report["summary"].values()))
    measured = {
        "perplexity": summary.get("accuracy", {}).get("perplexity"),
        "perplexity_increase": summary.get("perplexity_increase"),
        "size_mb": summary.get("size_mb"),
        "decode_tokens_per_s": summary.get("decode_tokens_per_s"),
        "speedup": summary.get("speedup"),
        "passed": result.passed,
        "folder": str(result.folder),
    }
    log(
        f"mixed: measured perplexity {measured['perplexity']} (+{(measured['perplexity_increase'] or 0):.2%}), size {measured['size_mb']} MB"
    )
    header = [
        f"# Chosen by `slimline mixed` from {sensitivity_dir}/sensitivity.json: each layer's format with the least summed",
        f"# next-token KL whose layer weights fit {budget / 2**20:.2f} MB (the recipe's own formats: {estimate['recipe_weight_mb']} MB).",
        f"# Estimated summed KL {estimate['chosen_kl']:.6f} against the recipe's {estimate['recipe_kl']:.6f}.",
        "# Changed from the recipe's format (KL when the layer alone takes it, recipe's -> chosen):",
        *(
            f"#   {label[n]}: {default[n]} -> {f} ({options[n][default[n]][0]:.2e} -> {options[n][f][0]:.2e})"
            for n, f in sorted(changed.items(), key=lambda kv: label[kv[0]])
        ),
        f"# Measured: perplexity {measured['perplexity']}, size {measured['size_mb']} MB, in {result.folder}.",
    ]
    (out / "mixed.yaml").write_text("\n".join(header) + "\n" + yaml.safe_dump(trial, sort_keys=False))
    summary_out = {
        "recipe": recipe.name,
        "kind": "weight_only",
        "budget_weight_mb": round(budget / 2**20, 3),
        "estimate": estimate,
        "formats": counts,
        "changed": {label[n]: f for n, f in changed.items()},
        "measured": measured,
        "chosen": chosen,
    }
    (out / "mixed.json").write_text(json.dumps(summary_out, indent=2))
    return summary_out
