"""What flows between stages: a torch model in memory, or an ONNX graph on disk.

Both carry the tokenizer, the task and the HF config, so that any later stage (and the evaluator)
can build inputs and read shapes without going back to the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep recipe validation free of torch imports
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass
class ModelInfo:
    """Where the model came from and how to read its outputs."""

    source: str  # as written in the recipe
    path: Path  # the resolved local folder
    task: str  # feature-extraction | text-classification
    pooling: str = "mean"  # for feature-extraction: mean | cls
    file_hashes: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)  # e.g. the hub repository and the commit it resolved to


@dataclass
class TorchModel:
    """A transformers model in memory (eval mode, float32 unless a stage changed it)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo
    saved: Path | None = None  # a folder where a stage already wrote this model with save_pretrained
    # rebuilds the model on a device ("cuda"), for models that can't be moved once built (bitsandbytes)
    load_on: Callable[[str], Any] | None = None

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    label = "a torch model"


@dataclass
class OnnxModel:
    """An ONNX graph on disk (``path`` is a model.onnx, maybe with external data beside it)."""

    path: Path
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo
    config: Any  # the HF PretrainedConfig of the model it was exported from

    label = "an ONNX model"
