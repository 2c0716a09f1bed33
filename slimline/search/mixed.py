"""``slimline mixed RECIPE --sensitivity DIR``: each layer's format chosen under the recipe's budget,
from measured sensitivities, then built and measured.

For a recipe whose quantizer is ``quantize.dynamic_int8`` each layer is int8 or float (its
``exclude``). The choice is a 0/1 knapsack: keep as many weight bytes in int8 as possible while the
sum of the layers' measured mean-cosine drops (``slimline sensitivity``) stays within the recipe's
``max_fidelity_drop``, less what the float graph already loses. Summing drops is an estimate (layer
errors are not exactly additive), so the chosen point is then built and measured by a real run; if
the measured drop breaks the budget, the estimate's budget is scaled by estimate/measured and the
choice made again, up to ``rounds`` times. Only measured figures are reported as results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from slimline import api
from slimline.errors import OutputError, RecipeError

Log = Callable[[str], None]
STEP = 1e-6  # knapsack resolution of the cosine drops


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


def mixed(
    recipe_ref: str | Path,
    sensitivity_dir: Path,
    out: Path,
    *,
    model: str | None = None,
    task: str | None = None,
    rounds: int = 3,
    log: Log = print,
) -> dict[str, Any]:
    _, recipe = api.load_recipe(recipe_ref, (), model, task)
    raw = recipe.model_dump(mode="json")
    index = next((i for i, s in enumerate(raw["stages"]) if "quantize.dynamic_int8" in s), None)
    if index is None:
        raise RecipeError(
            f"mixed: {recipe.name} has no quantize.dynamic_int8 stage; mixed precision chooses int8 or float per layer "
            "for that quantizer so far."
        )
    budget = recipe.evaluate.budgets.max_fidelity_drop
    if budget is None:
        raise RecipeError(f"mixed: {recipe.name} has no evaluate.budgets.max_fidelity_drop to choose under; add one.")
    try:
        sens = json.loads((sensitivity_dir / "sensitivity.json").read_text())
    except (OSError, ValueError):
        raise RecipeError(
            f"--sensitivity {sensitivity_dir}: no readable sensitivity.json; run `slimline sensitivity {recipe.name} --out DIR` first."
        ) from None
    if sens.get("recipe") != recipe.name:
        raise RecipeError(f"--sensitivity {sensitivity_dir}: measured for recipe {sens.get('recipe')}, not {recipe.name}.")
    if out.exists():
        raise OutputError(f"--out {out}: exists; choose a new folder.")
    rows = [r for r in sens["rows"] if r["format"] == "int8"]
    if not rows:
        raise RecipeError(f"--sensitivity {sensitivity_dir}: has no int8 measurements; run it with int8 among --formats.")
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
        stage = dict(raw["stages"][index]["quantize.dynamic_int8"])
        stage["exclude"] = sorted({*stage.get("exclude", []), *(label[n] for n in kept)})
        stage["fallback"] = "none"  # the choice is this one, measured; no second selection behind it
        trial = json.loads(json.dumps(raw))
        trial["stages"][index] = {"quantize.dynamic_int8": stage}
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
