"""slimline's Python API: three verbs, the same ones the CLI runs.

```python
from slimline import api

result = api.run("minilm-int8", out="runs/minilm-int8")  # a recipe file, a built-in name, or a Recipe
result.verdict.state                                      # "passed" | "failed" | "no budgets"
again = api.evaluate("runs/minilm-int8", overrides=["evaluate.targets=[ort-cuda]"])
gate = api.check("runs/minilm-int8", budgets=["min_speedup=2"], require=["ort-cpu"])
gate.passed, [row["name"] for row in gate.verdict.failed]
```

Errors are ``slimline.errors.SlimlineError`` subclasses whose message says what is wrong, where and
how to fix it (the CLI prints them and exits 2). A ``Recipe`` built in Python and the same recipe
loaded from YAML are equal objects, so ``run`` takes either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimline.builtin import find_recipe
from slimline.errors import RecipeError
from slimline.evaluate.budgets import Verdict
from slimline.evaluate.gate import judge_report, load_report
from slimline.pipeline import evaluate_folder, run_recipe
from slimline.recipe import Recipe, expand_shorthands, from_dict, read_yaml
from slimline.stage import Reporter


@dataclass
class Result:
    """A run folder and what its evaluation found (``report`` and ``verdict`` are None without one)."""

    folder: Path
    report: dict[str, Any] | None
    verdict: Verdict | None

    @property
    def passed(self) -> bool:
        return self.verdict is not None and self.verdict.passed


def load_recipe(
    recipe: str | Path | Recipe | dict,
    overrides: Sequence[str] = (),
    model: str | None = None,
    task: str | None = None,
) -> tuple[Path | None, Recipe]:
    """A recipe from a YAML path, a built-in recipe's name, a mapping, or a ``Recipe``, with ``--set``-style
    overrides. ``model`` and ``task`` replace the recipe's model (a generic recipe on your model:
    ``load_recipe("encoder-int8", model="models/my-finetune", task="text-classification")``)."""
    from slimline.yamlconf import apply_override

    if isinstance(recipe, Recipe):
        raw, where, path = recipe.model_dump(mode="json"), f"recipe {recipe.name}", None
    elif isinstance(recipe, dict):
        raw, where, path = expand_shorthands(json.loads(json.dumps(recipe))), "<recipe>", None
    else:
        path = find_recipe(str(recipe))
        raw, where = expand_shorthands(read_yaml(path)), str(path)
    if model is not None or task is not None:
        spec = raw.setdefault("model", {})
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: `model` is not a mapping, so --model/--task can't replace its parts.")
        if model is not None:
            spec["source"] = str(model)
            spec.pop("revision", None)
        if task is not None:
            spec["task"] = task
    for text in overrides:
        apply_override(raw, text)
    return path, from_dict(raw, where)


def run(
    recipe: str | Path | Recipe | dict,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),
    model: str | None = None,
    task: str | None = None,
    force: bool = False,
    evaluate: bool = True,
    reporter: Reporter | None = None,
) -> Result:
    """Run a recipe: its stages, then (unless ``evaluate=False``) its evaluation. ``model``/``task``
    replace the recipe's model. ``out`` defaults to ``runs/<recipe name>``; an existing folder is
    replaced only with ``force`` and only if slimline wrote it."""
    path, parsed = load_recipe(recipe, overrides, model, task)
    folder = Path(out) if out is not None else Path("runs") / parsed.name
    report = run_recipe(
        parsed, folder, force=force, reporter=reporter, recipe_path=str(path) if path else None, evaluate=evaluate
    )
    if not report:
        return Result(folder, None, None)
    return Result(folder, report, Verdict(report["budgets"]))


def evaluate(run_dir: str | Path, overrides: Sequence[str] = (), reporter: Reporter | None = None) -> Result:
    """Evaluate a run folder's ONNX artifact again on this machine (e.g. built with ``evaluate=False``
    on a CPU box, measured on a GPU box with ``overrides=["evaluate.targets=[ort-cuda]"]``)."""
    folder = Path(run_dir)
    report = evaluate_folder(folder, tuple(overrides), reporter)
    return Result(folder, report, Verdict(report["budgets"]))


def check(run_dir: str | Path, budgets: Sequence[str] = (), require: Sequence[str] = ()) -> Result:
    """The CI gate: recompute a run's verdict from its stored figures and budgets. ``budgets`` add or
    tighten limits (``"min_speedup=2"``, ``"targets.ort-cuda.min_speedup=3"``); ``require`` names
    targets that must have been measured."""
    folder = Path(run_dir)
    report = load_report(folder)
    return Result(folder, report, judge_report(report, list(budgets), list(require)))
