"""``compile.tune``: keep a fused op only where it is faster, measured on the target.

A fused contrib op is not always the fastest way to run what it replaces. ONNX Runtime 1.32's CPU
kernel for SkipLayerNormalization (with the bias input that BERT's fusion gives it) is slower than
the two Adds and the LayerNormalization it stands for: on all-MiniLM-L6-v2 at batch 32 x 128
tokens, 2 threads, rewriting its 12 nodes back made the whole fp32 graph about 1.10x faster and the
dynamic-int8 graph about 1.2x faster (docs/compile.md). Nothing else in the toolchain would notice:
the fusion is correct, it is only slow.

For each candidate op type in the graph, the stage writes the graph with every such node in its
unfused form, times both whole graphs on the CPU EP with the run's threads, interleaved (ABBA), at
each batch size, and keeps the rewrite only if it is faster by at least ``min_gain`` at one batch
size and not slower by more than that at any. It also checks that ONNX Runtime's own session-time
optimizer does not fuse the rewrite back (the op counts of the graph it actually runs), and that the
rewrite is right: each rewritten node against the fused one alone, on random rows with its own
weights (error under 1e-4 of the output's scale), and the whole graph's outputs against the input
graph's on calibration text (cosine; in a dynamic-int8 graph the activations re-round, so this
check is loose). Every timing and decision is reported.

The candidates are the fused ops whose fusion-registry record has an unfused form
(``compile/fusions/registry.py``; today SkipLayerNormalization -> Add (+ Add bias) +
LayerNormalization and SkipSimplifiedLayerNormalization -> Add (+ Add bias) +
SimplifiedLayerNormalization, written in ``compile/fusions/unfuse.py``).
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from slimline.artifact import OnnxModel
from slimline.compile.fusions.registry import unfusable
from slimline.errors import StageError
from slimline.family import family_of
from slimline.measure.inputs import calibration_feeds
from slimline.measure.timer import cpu_busy, interleave, median
from slimline.runtime import SERVING_CONFIG, ort_session
from slimline.stage import Context, Stage, StageResult

UNFUSABLE = unfusable()  # fused op -> its registry record (compile/fusions/registry.py)
CandidateOp = Literal[tuple(UNFUSABLE)]  # type: ignore[valid-type]


TUNE_KEY = "slimline.compile.tune"


def mark(model: Any, op_type: str, count: int, ratios: dict[int, float]) -> None:
    """Record in the model's metadata that ``op_type`` was un-fused on purpose, and the timings that
    decided it, so that `slimline inspect --fusions` does not present the nodes as missed fusions."""
    from onnx import helper

    timings = ", ".join(f"{r:.2f}x at b{b}" for b, r in ratios.items())
    note = f"{op_type}: {count} nodes un-fused, faster on the ONNX Runtime CPU EP ({timings})"
    entries = {p.key: p.value for p in model.metadata_props}
    notes = [x for x in entries.get(TUNE_KEY, "").split("; ") if x and not x.startswith(f"{op_type}:")] + [note]
    helper.set_model_props(model, {**entries, TUNE_KEY: "; ".join(notes)})


ACTIVATIONS = {"BiasGelu": 1}  # inputs that are activations, per fused op (2 for the Skip norms)


def node_error(model: Any, op_type: str, rows: int = 16) -> float:
    """Largest error, relative to the output's scale, of each ``op_type`` node against its unfused form,
    run alone on random rows with the node's own weights (a check that holds whatever surrounds the node,
    int8 included, where the whole graph's outputs re-round differently)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    opset = [
        helper.make_opsetid("", max(17, *(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))),
        helper.make_opsetid("com.microsoft", 1),
    ]
    rng = np.random.default_rng(0)
    worst = 0.0
    for node in (n for n in model.graph.node if n.op_type == op_type and n.domain == "com.microsoft"):
        # the node's activations (x and skip for a norm, x for BiasGelu) come first, its weights after
        acts = list(node.input[: ACTIVATIONS.get(op_type, 2)])
        weights = [inits.get(i) for i in node.input[len(acts) :] if i]
        if not weights or any(w is None for w in weights) or any(a in inits for a in acts):
            continue  # a weight computed in the graph (a Constant node): covered by the whole-graph check only
        width = int(numpy_helper.to_array(weights[0]).shape[-1])
        dtype = weights[0].data_type  # fp32, or fp16 after quantize.fp16
        single = helper.make_node(op_type, list(node.input), ["y"], domain="com.microsoft", name="n")
        single.attribute.extend(node.attribute)
        io = [helper.make_tensor_value_info(x, dtype, [2, rows, width]) for x in acts]
        out = [helper.make_tensor_value_info("y", dtype, None)]
        graph = helper.make_graph([single], "fused", io, out, weights)
        fused = helper.make_model(graph, opset_imports=opset, ir_version=model.ir_version)  # what this ORT loads
        plain = onnx.ModelProto.FromString(fused.SerializeToString())
        UNFUSABLE[op_type].unfuse(plain)
        np_type = helper.tensor_dtype_to_np_dtype(dtype)
        feeds = {x: (rng.standard_normal((2, rows, width)) * 4).astype(np_type) for x in acts}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        for key, value in SERVING_CONFIG.items():  # as runtime.ort_session
            options.add_session_config_entry(key, value)
        a, b = (
            ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (fused, plain)
        )
        a, b = a.astype(np.float32), b.astype(np.float32)
        worst = max(worst, float(np.abs(a - b).max() / max(1.0, np.abs(a).max())))
    return worst


class Tune(Stage):
    """Time each fused op against its unfused form in the whole graph; keep the faster (ORT CPU EP)."""

    kind = "compile.tune"
    consumes = (OnnxModel,)

    candidates: list[CandidateOp] = Field(
        default_factory=lambda: list(UNFUSABLE), description="fused op types to time against their unfused form"
    )
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        [1, 32], min_length=1, max_length=16, description="batch sizes timed (the decision must hold at each)"
    )
    seq_len: int = Field(128, ge=1, le=131072, description="tokens per sequence in the timed batches")
    repeats: int = Field(10, ge=3, le=10_000, description="timed runs per graph and batch size (medians compared)")
    min_gain: float = Field(0.03, ge=0, lt=1, description="the unfused form must be this much faster to be kept")
    min_cosine: float = Field(
        0.98,
        ge=0,
        le=1,
        description="whole-graph outputs against the input graph on calibration text: ~1.0 for float graphs; dynamic "
        "int8 re-rounds its activations (~0.995 on MiniLM), so the exact check is per node",
    )

    def run(self, artifact: OnnxModel, ctx: Context) -> StageResult:
        import onnx

        current = onnx.load(str(artifact.path))
        texts = ctx.data.calibration[:64] if ctx.load_data else []
        if not texts:
            raise StageError(f"{self.kind}: needs calibration text to time and check the graph; set evaluate.data.")
        busy = cpu_busy()
        report: dict[str, Any] = {"provider": "CPUExecutionProvider", "threads": ctx.threads or "all", "cpu_busy_before": busy}
        if busy is not None and busy > 0.25:
            ctx.warn(f"{self.kind}: other processes kept {busy:.0%} of the CPUs busy; the timings below are noisy.")
        work = ctx.stage_dir("tune")
        best = work / "model.onnx"
        self._save(current, best)
        opset = next((o.version for o in current.opset_import if o.domain in ("", "ai.onnx")), 0)
        for op in self.candidates:
            if op == "SkipLayerNormalization" and opset < 17:  # LayerNormalization is an ONNX op from opset 17
                report[op] = f"kept fused: the graph's opset {opset} has no LayerNormalization (17+)"
                continue
            trial = copy.deepcopy(current)
            n = UNFUSABLE[op].unfuse(trial)
            if not n:
                continue
            trial_path = work / f"unfused_{op}.onnx"
            self._save(trial, trial_path)
            kept = self._ort_keeps(trial_path, UNFUSABLE[op].unfused_op, op, ctx)
            if not kept:
                report[op] = f"kept fused: ONNX Runtime fuses the {n} rewritten nodes back at load time"
                continue
            ratios = {}
            for batch in self.batch_sizes:
                feeds = self._feeds(artifact, texts, batch)
                fused_s, unfused_s = self._time(best, trial_path, feeds, ctx)
                ratios[batch] = fused_s / unfused_s
                report[f"{op}.b{batch}"] = (
                    f"fused {fused_s * 1e3:.2f} ms, unfused {unfused_s * 1e3:.2f} ms ({ratios[batch]:.3f}x)"
                )
            faster = any(r >= 1 + self.min_gain for r in ratios.values()) and all(r >= 1 - self.min_gain for r in ratios.values())
            if faster:
                err = node_error(current, op)
                cos = self._check(artifact, best, trial_path, texts, ctx)
                if err > 1e-4 or cos < self.min_cosine:
                    raise StageError(
                        f"{self.kind}: the unfused {op} differs from the fused one (per node: max error {err:.3g}, "
                        f"limit 1e-4; whole graph: min cosine {cos:.5f}, limit {self.min_cosine}). This is a bug in "
                        f"the rewrite; drop {op} from `candidates` and report it."
                    )
                report[f"{op}.node_max_error"] = float(f"{err:.3g}")
                report[f"{op}.min_cosine"] = round(cos, 6)
                current = trial
                mark(current, op, n, ratios)
                self._save(current, best)
            report[op] = f"{'unfused' if faster else 'kept fused'} ({n} nodes; {self.min_gain:.0%} needed)"
            for path in (trial_path, Path(f"{trial_path}.data")):
                path.unlink(missing_ok=True)
        report["ops"] = ", ".join(f"{k} {v}" for k, v in Counter(n.op_type for n in current.graph.node).most_common(6))
        return StageResult(OnnxModel(best, artifact.tokenizer, artifact.info, artifact.config), report)

    @staticmethod
    def _save(model: Any, path: Path) -> None:
        """As the other stages hand on their graphs: plain ONNX, so that the weight-sharing marks of
        ``slimline.onnxfile`` survive to the run folder's final save; external data only where protobuf
        needs it. A copy, because saving external data moves the weights out of the proto."""
        import onnx

        large = model.ByteSize() > 1_500_000_000
        out = copy.deepcopy(model) if large else model
        onnx.save_model(out, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)

    @staticmethod
    def _ort_keeps(path: Path, unfused_op: str, fused_op: str, ctx: Context) -> bool:
        """Whether the graph ONNX Runtime runs (after its own session-time fusions) still has the rewrite."""
        import onnx

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            ort_session(path, ctx.threads, optimized_to=optimized)
            counts = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
        return counts.get(unfused_op, 0) > 0 and not counts.get(fused_op, 0)

    def _feeds(self, artifact: OnnxModel, texts: list[str], batch: int) -> dict[str, np.ndarray]:
        import onnx

        inputs = [i.name for i in onnx.load(str(artifact.path), load_external_data=False).graph.input]
        chosen = [texts[i % len(texts)] for i in range(batch)]
        return calibration_feeds(
            artifact.tokenizer, chosen, inputs, batch=batch, max_length=self.seq_len, fixed=True, config=artifact.config
        )[0]

    def _time(self, a: Path, b: Path, feeds: dict, ctx: Context) -> tuple[float, float]:
        sessions = {"fused": ort_session(a, ctx.threads, spinning=False), "unfused": ort_session(b, ctx.threads, spinning=False)}
        times = interleave({name: lambda s=s: s.run(None, feeds) for name, s in sessions.items()}, self.repeats, warmup=1)
        return median(times["fused"]), median(times["unfused"])

    @staticmethod
    def _check(artifact: OnnxModel, a: Path, b: Path, texts: list[str], ctx: Context) -> float:
        fid = family_of(artifact.info.task).output_fidelity(
            a, b, artifact.tokenizer, texts[:32], artifact.info.pooling, ctx.threads, artifact.config
        )
        return float(fid["calibration.min_cosine"])
