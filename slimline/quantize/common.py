"""What every ONNX quantizer stage shares: exclusions, the fallback rule, kernel timing, the cosine guard.

``fallback: auto`` keeps a layer in float when its isolated output error on calibration data is above
``max_layer_error``, or (with ``measure_speed: true``) when its quantized kernel is not faster than the
float MatMul on this machine at the layer's own shape. Both reasons are listed in the report.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from slimline.errors import StageError
from slimline.family import family_of
from slimline.measure.quantsim import resolve_reduce_range
from slimline.measure.timer import interleave, median
from slimline.stage import Context, Stage

QUANTIZED_OPS = {
    "MatMulInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "MatMulNBits",
    "MatMulQ4",  # slimline's own (ai.slimline)
    "MatMulQ8",
    "GatherQ4",
    "GatherQ8",
    "DequantizeLinear",
    "QuantizeLinear",
    "GatherBlockQuantized",
}


class OnnxQuantizer(Stage):
    """Options common to the ONNX quantizers. Those that hand the graph to one of ONNX Runtime's
    quantizers (``FileQuantizer`` below) share its whole sequence; ``weight_only`` and ``fp16`` write
    their own graphs and call the same helpers step by step."""

    exclude: list[str] = Field(
        default_factory=list,
        description="kept in float: node-name globs, or layers by role, e.g. role:ffn.out@0 (layer 0's FFN output projection)",
    )
    calibration_texts: int = Field(128, ge=8, le=100_000, description="calibration texts for the per-layer error (and ranges)")
    min_cosine: float = Field(0.9, ge=0, le=1, description="fail if calibration outputs fall below this cosine")
    fallback: Literal["none", "auto"] = Field(
        "none", description="auto: keep layers in float whose error is above max_layer_error (or that got slower)"
    )
    max_layer_error: float = Field(
        0.05, gt=0, description="fallback: auto keeps a layer whose relative output error exceeds this"
    )
    measure_speed: bool = Field(False, description="fallback: auto also keeps layers whose quantized kernel is not faster")
    speed_rows: int = Field(4096, ge=1, le=1_000_000, description="rows (batch x tokens) of the kernel timing for measure_speed")

    @field_validator("exclude")
    @classmethod
    def _roles_are_known(cls, value: list[str]) -> list[str]:
        return roles_are_known(value)


def roles_are_known(value: list[str]) -> list[str]:
    """Validation of a list of node globs / ``role:`` entries: an unknown role fails at load."""
    from slimline.family import layers_by_role

    for entry in value:
        if entry.startswith("role:"):
            _, error = layers_by_role({}, entry)
            if error:
                raise ValueError(error)
    return value


class FileQuantizer(OnnxQuantizer):
    """The sequence every stage that calls one of ONNX Runtime's quantizers (file in, file out) runs,
    written once:

        refuse a quantized graph -> prepare (calibration) -> exclude -> quantize -> each layer's error
        -> fallback: auto (quantize again with the offenders in float) -> report -> the output guard

    A stage fills in only what differs: ``quantize_file`` (the ORT call), and optionally ``prepare``,
    ``always_float``, ``layer_errors``, ``timing_quantizer`` and ``describe``."""

    workdir: ClassVar[str]  # its folder in the run's scratch

    def prepare(self, model: Any, artifact: Any, ctx: Context) -> Any:
        """What the quantizer needs besides the graph (e.g. calibration feeds); None by default."""
        return None

    def quantize_file(self, src: Path, dst: Path, prepared: Any, exclude: set[str]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def always_float(self, model: Any, prepared: Any) -> set[str]:
        """Nodes this quantizer keeps in float whatever the options say (reported by ``describe``)."""
        return biased_attention(model)

    def layer_errors(
        self, model: Any, quantized: Any, artifact: Any, prepared: Any, ctx: Context
    ) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
        """Each quantized layer's output error on calibration inputs, and its weight shape (K, N)."""
        return {}, {}

    def timing_quantizer(self) -> Callable[[Path, Path], None] | None:
        """How to quantize a one-MatMul model for ``measure_speed`` (None: no kernel timing)."""
        return None

    def describe(self, model: Any, quantized: Any, excluded: set[str], floats: set[str], report: dict) -> None:
        """The stage's own report lines; raises StageError when nothing was quantized."""

    def worst_layers(self, model: Any, quantized: Any, errors: dict[str, float]) -> list[str]:
        return sorted(errors, key=lambda n: -errors[n])

    def run(self, artifact: Any, ctx: Context) -> Any:
        import onnx

        from slimline.artifact import OnnxModel
        from slimline.quantize.calib import layer_report
        from slimline.stage import StageResult

        model = onnx.load(str(artifact.path))
        refuse_quantized(model, self.kind)
        prepared = self.prepare(model, artifact, ctx)
        excluded = matching_nodes(model, self.exclude, ctx, self.kind)
        floats = excluded | self.always_float(model, prepared)
        out = ctx.stage_dir(self.workdir) / "model.onnx"
        self.quantize_file(artifact.path, out, prepared, floats)
        quantized = onnx.load(str(out))
        errors, shapes = self.layer_errors(model, quantized, artifact, prepared, ctx)
        kept = choose_fallback(self, errors, shapes, self.timing_quantizer(), ctx, ctx.stage_dir(f"{self.workdir}_kernels"))
        if kept:
            self.quantize_file(artifact.path, out, prepared, floats | set(kept))
            quantized = onnx.load(str(out))
            errors = {n: e for n, e in errors.items() if n not in kept}
        report: dict[str, Any] = {}
        self.describe(model, quantized, excluded, floats, report)
        report_fallback(report, kept)
        layer_report(errors, report)
        fidelity_guard(self, artifact, out, ctx, report, self.worst_layers(model, quantized, errors))
        return StageResult(OnnxModel(out, artifact.tokenizer, artifact.info, artifact.config), report)


def reduce_range_note(option: bool | str) -> str:
    """The report's line for ``reduce_range``: what was used, and why when it was chosen here."""
    from slimline.env import has_vnni

    value = resolve_reduce_range(option)
    if option != "auto":
        return str(value).lower()
    return f"{str(value).lower()} (auto: this CPU {'has' if has_vnni() else 'has no'} VNNI)"


def loads_in_ort(path: Path, stage: str) -> None:
    """The written graph must load in ONNX Runtime (onnx.checker rejects ORT's own ONNX-domain contrib ops)."""
    from slimline.runtime import ort_session

    try:
        ort_session(path, 1)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise StageError(
            f"{stage}: the rewritten graph does not load in ONNX Runtime ({str(e).splitlines()[0][:300]}). This is a slimline bug; please report it."
        ) from e


def refuse_quantized(model: Any, stage: str, allow: frozenset[str] = frozenset()) -> None:
    """Refuse a graph quantized before; ``allow`` lists quantized ops this stage can build on."""
    already = sorted({n.op_type for n in model.graph.node} & (QUANTIZED_OPS - allow))
    if already:
        raise StageError(
            f"{stage}: the model is already quantized (it has {', '.join(already)} nodes). "
            "Quantize the float model once: remove the earlier quantize stage or start from a float export."
        )


def biased_attention(model: Any) -> set[str]:
    """Attention nodes with an ``attention_bias`` input (MPNet's relative-position bias). ONNX Runtime's
    quantizer turns Attention into QAttention, which has no such input, and drops the bias without a
    word; these stay in float."""
    return {n.name for n in model.graph.node if n.op_type == "Attention" and len(n.input) > 5 and n.input[5]}


def module_path(node: Any) -> str:
    """A MatMul's module path: from the legacy exporter's node name (``/encoder/layer.0/output/dense/MatMul``)
    or the dynamo exporter's scope metadata (``model.layers.0.mlp.down_proj``); '' when neither is there."""
    if "/" in node.name:
        return node.name.strip("/").rsplit("/", 1)[0].replace("/", ".")
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            names = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            modules = [s for s in names[:-1] if "." in s]  # the last scope is the op itself
            return modules[-1] if modules else ""
    return ""


def matching_nodes(model: Any, patterns: list[str], ctx: Context, stage: str, key: str = "exclude") -> set[str]:
    """Node names matched by a stage's ``exclude`` (or ``include``, ``layers``) entries: globs on node names, or layer
    roles (``role:ffn.out@0``, resolved through the family adapter). One that matches nothing is a warning."""
    from slimline.family import layers_by_role

    names = [n.name for n in model.graph.node if n.name]
    paths = {n.name: module_path(n) for n in model.graph.node if n.name and n.op_type in ("MatMul", "Gemm", "FusedMatMul")}
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith("role:"):
            matched, error = layers_by_role(paths, pattern)
            if error:
                raise StageError(f"{stage}: {key} {error}.")
        else:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            effect = "nothing was kept in float for it" if key == "exclude" else "it selects nothing"
            ctx.warn(f"{stage}: {key} pattern `{pattern}` matches no node; {effect}.")
        chosen.update(matched)
    return chosen


def weight_of(model: Any, node: Any) -> np.ndarray | None:
    """The ``[K, N]`` float weight a MatMul multiplies by (input 1), or None.

    A com.microsoft FusedMatMul with ``transB=1`` (the tied LM head reading the embedding table
    ``[vocab, hidden]``) counts too: its weight is the transpose.
    """
    from onnx import helper, numpy_helper

    if node.op_type not in ("MatMul", "FusedMatMul", "Attention", "Gemm"):
        return None
    init = {t.name: t for t in model.graph.initializer}
    if len(node.input) < 2 or node.input[1] not in init:
        return None
    w = numpy_helper.to_array(init[node.input[1]])
    if w.ndim != 2 or w.dtype != np.float32:
        return None
    if node.op_type == "FusedMatMul":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or not attrs.get("transB", 0):
            return None
        return np.ascontiguousarray(w.T)
    return w


def weighted_layers(model: Any, op_types: Any) -> dict[str, tuple[str, str, np.ndarray]]:
    """node name -> (activation input, weight name, ``[K, N]`` weight) for the named op types with a constant weight."""
    return {
        n.name: (n.input[0], n.input[1], w)
        for n in model.graph.node
        if n.op_type in op_types and n.name and (w := weight_of(model, n)) is not None
    }


def report_fallback(report: dict, kept: dict[str, str]) -> None:
    """The layers ``fallback: auto`` kept in float, each with its reason."""
    report["fallback_kept"] = len(kept)
    for name, why in kept.items():
        report[f"fallback.{name}"] = why


def single_matmul(k: int, n: int, seed: int = 0) -> Any:
    """A one-node ``Y = X @ W`` model with a random ``[k, n]`` weight, for timing kernels."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")],
        "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # loads on older ORT too


def kernel_speedups(
    shapes: set[tuple[int, int]], quantize: Callable[[Path, Path], None], workdir: Path, threads: int, rows: int, repeats: int = 7
) -> dict[tuple[int, int], float]:
    """Float-MatMul time / quantized-kernel time per ``(K, N)``, interleaved (ABBA), median of ``repeats``."""
    import onnx

    from slimline.runtime import ort_session

    out = {}
    for k, n in sorted(shapes):
        f32, q = workdir / f"mm_{k}x{n}.onnx", workdir / f"mm_{k}x{n}_q.onnx"
        onnx.save_model(single_matmul(k, n), str(f32))
        quantize(f32, q)
        sessions = {"float": ort_session(f32, threads, spinning=False), "quantized": ort_session(q, threads, spinning=False)}
        x = {"X": np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)}
        times = interleave({name: lambda s=s, x=x: s.run(None, x) for name, s in sessions.items()}, repeats, warmup=1)
        out[(k, n)] = median(times["float"]) / median(times["quantized"])
    return out


def choose_fallback(
    stage: OnnxQuantizer,
    errors: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    quantize_one: Callable[[Path, Path], None] | None,
    ctx: Context,
    workdir: Path,
) -> dict[str, str]:
    """Layers ``fallback: auto`` keeps in float, each with its reason."""
    if stage.fallback != "auto":
        return {}
    keep = {
        name: f"output error {err:.4f} > max_layer_error {stage.max_layer_error}"
        for name, err in errors.items()
        if err > stage.max_layer_error
    }
    if stage.measure_speed and quantize_one is not None:
        speedups = kernel_speedups(set(shapes.values()), quantize_one, workdir, ctx.threads, stage.speed_rows)
        for name, shape in shapes.items():
            if name not in keep and speedups[shape] <= 1.0:
                keep[name] = f"quantized kernel {speedups[shape]:.2f}x the float MatMul at {shape[0]}x{shape[1]} (not faster)"
    return keep


def fidelity_guard(stage: Any, artifact: Any, out: Path, ctx: Context, report: dict, worst: list[str], hint: str = "") -> None:
    """Cosine of the quantized outputs against the float graph on calibration text; below min_cosine, fail."""
    texts = ctx.data.calibration[:64] if ctx.load_data else []
    if not texts:
        ctx.warn(f"{stage.kind}: no calibration text, so the output error was not measured.")
        return
    fid = family_of(artifact.info.task).output_fidelity(
        artifact.path, out, artifact.tokenizer, texts, artifact.info.pooling, ctx.threads, artifact.config
    )
    report.update(fid)
    if fid["calibration.mean_cosine"] < stage.min_cosine:
        raise StageError(
            f"{stage.kind}: outputs on calibration text fell to mean cosine {fid['calibration.mean_cosine']:.3f} "
            f"(< min_cosine={stage.min_cosine}). "
            + (hint or f"Highest-error layers: {', '.join(worst[:3]) or 'n/a'}. Add them to `exclude`, or set fallback: auto.")
        )
