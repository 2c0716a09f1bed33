"""The ``evaluate`` section of a recipe: data, targets, speed, memory, generation, and budgets.

These are the evaluators' own options, so they live with the evaluators; ``slimline.recipe`` puts them
together with the model and the stages. A recipe validates here before any compute runs: every
size has bounds, and no limit may be infinite or NaN.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimline.yamlconf import short

MAX_TOKENS = 1 << 17  # longest sequence any length field may ask for (the model's own limit is checked at run time)
MAX_BATCH = 4096
Task = Literal["feature-extraction", "text-classification", "token-classification", "text-generation"]
TargetName = Literal["ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda"]


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` in a recipe is refused (a budget of .inf can never fail)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class DataSpec(Strict):
    source: str = "builtin:shakespeare"
    text_column: str = "text"
    pair_column: str | None = Field(None, description="second text of a sentence pair (CSV/TSV/JSONL)")
    score_column: str | None = Field(None, description="gold similarity score of a pair, for Spearman")
    label_column: str | None = Field(None, description="gold class label, for text-classification accuracy")
    calibration_size: int = Field(256, ge=1, le=1_000_000)
    evaluation_size: int = Field(2000, ge=2, le=1_000_000)
    max_length: int = Field(128, ge=8, le=MAX_TOKENS, description="truncate texts to this many tokens")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class SpeedSpec(Strict):
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
        if len(set(v)) != len(v):
            raise ValueError(f"a batch size is listed twice in {v}; list each once")
        return v


class GenerationSpec(Strict):
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
    cuda_graph: bool = Field(
        False,
        description="ort-cuda decode timing: replay each step as one CUDA graph (ONNX Runtime's enable_cuda_graph; "
        "GroupQueryAttention graphs); falls back to plain launches, with the reason in the report, where ORT refuses",
    )

    @model_validator(mode="after")
    def _stride_fits(self) -> GenerationSpec:
        if self.stride > self.context:
            raise ValueError(
                f"evaluate.generation.stride ({self.stride}) must not exceed context ({self.context}): tokens would go unscored."
            )
        return self


AccuracyLimit = Annotated[float | str, Field(description="absolute drop, or relative as a string like '2%'")]


class Limits(Strict):
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
                f"{where}: `{short(limit)}` is neither a number (absolute drop) nor a percentage like '2%'"
            ) from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: `{short(limit)}` is not finite; a budget that can never fail checks nothing")
    if value < 0:
        raise ValueError(f"{where}: a drop limit can't be negative ({short(limit)})")
    return value, relative


class EvaluateSpec(Strict):
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

    @field_validator("targets", "required_targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a target is listed twice in {v}; list each once")
        return v

    @model_validator(mode="after")
    def _required_are_targets(self) -> EvaluateSpec:
        missing = [t for t in self.required_targets if t not in self.targets]
        if missing:
            raise ValueError(f"evaluate.required_targets: {missing} are not in evaluate.targets {self.targets}; add them there.")
        return self
