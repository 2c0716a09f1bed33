"""Every stage, registered by type: the recipe key is the stage class's ``kind``.

One explicit table a reader (and a static import checker) can follow, with no module names in
strings. Importing it imports each stage module, which pulls in no torch, ONNX or ONNX Runtime:
those are imported inside ``run``, so validating a recipe stays fast.
"""

from __future__ import annotations

from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.compile.tune import Tune
from slimline.prune.recover import Recover
from slimline.prune.structured import Structured
from slimline.prune.unstructured import NM, Magnitude, Wanda
from slimline.quantize.bnb import BitsAndBytes
from slimline.quantize.dynamic import DynamicInt8
from slimline.quantize.fp16 import Fp16
from slimline.quantize.smoothquant import SmoothQuant
from slimline.quantize.static import StaticInt8
from slimline.quantize.weight_only import WeightOnly
from slimline.stage import Stage

STAGE_TYPES: tuple[type[Stage], ...] = (
    Magnitude,
    NM,
    Wanda,
    Structured,
    Recover,
    SmoothQuant,
    Export,
    Fuse,
    Tune,
    DynamicInt8,
    WeightOnly,
    StaticInt8,
    Fp16,
    BitsAndBytes,
)
STAGES: dict[str, type[Stage]] = {cls.kind: cls for cls in STAGE_TYPES}
