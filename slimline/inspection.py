"""``slimline inspect``: what is in an ONNX file or a run folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from slimline.errors import ModelError


def _model_file(path: Path) -> Path:
    """The ONNX file of ``path`` (a file, or a run folder holding model.onnx); a clear error if none."""
    if path.is_dir():
        path = path / "model.onnx"
    if not path.exists():
        raise ModelError(f"{path}: not found. Give an ONNX file or a slimline run folder (with model.onnx).")
    return path


def _unreadable(path: Path, err: Exception) -> ModelError:
    return ModelError(f"{path}: not a readable ONNX model ({type(err).__name__}). Is the file complete?")


def _manifest_summary(folder: Path) -> dict[str, Any]:
    """The parts of a run's manifest that inspect shows; a damaged manifest is a clear error."""
    from slimline.runfolder import read_manifest

    manifest = read_manifest(folder)
    try:
        if manifest is None:
            raise TypeError("not a slimline manifest")
        versions = manifest.get("versions") or {}
        return {
            "recipe": str(manifest["recipe"]["name"]),
            "model": str(manifest["inputs"]["model"]),
            "finished": manifest.get("finished"),
            "stages": [{"kind": str(s["kind"]), "wall_s": s.get("wall_s")} for s in manifest.get("stages", [])],
            "versions": {k: versions.get(k) for k in ("torch", "transformers", "onnxruntime")},
        }
    except (KeyError, TypeError, AttributeError) as err:
        raise ModelError(
            f"{folder / 'manifest.json'}: damaged or not a slimline manifest ({type(err).__name__}: {str(err)[:80]}). "
            "Run the recipe again to rebuild the folder."
        ) from None


def is_model_source(path: Path) -> bool:
    """A model to describe (not an ONNX file or run folder): pip:, hf:, a GGUF file, or an HF folder."""
    text = str(path)
    if text.startswith(("pip:", "hf:")) or path.suffix == ".gguf":
        return True
    return path.is_dir() and (path / "config.json").is_file() and not (path / "model.onnx").exists()


def inspect_path(path: Path) -> dict[str, Any]:
    import onnx

    if is_model_source(path):
        from slimline.models.describe import describe_model

        return {"model": describe_model(str(path))}
    folder = path if path.is_dir() else None
    path = _model_file(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; give an ONNX file or a slimline run folder (with model.onnx).")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, ValueError, ... for a corrupt file
        raise _unreadable(path, err) from None
    if not model.graph.node and not model.graph.input:
        raise ModelError(f"{path}: holds no graph (an empty or truncated file). Re-export the model.")
    data_files = [p for p in path.parent.glob(path.name + ".data")]

    def io(values):
        return [
            {
                "name": v.name,
                "type": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    info: dict[str, Any] = {
        "path": str(path),
        "size_mb": round((path.stat().st_size + sum(p.stat().st_size for p in data_files)) / 1e6, 2),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "nodes": len(model.graph.node),
        "ops": dict(Counter(n.op_type for n in model.graph.node).most_common()),
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
    }
    if folder is not None and (folder / "manifest.json").exists():
        info["manifest"] = _manifest_summary(folder)
    if folder is not None and (folder / "report.json").exists():
        from slimline.evaluate.gate import judge_report, load_report

        report = load_report(folder)
        state = judge_report(report).state
        info["report"] = {"verdict": state, "passed": state == "passed", "summary": report.get("summary", {})}
        if bool(report["passed"]) != (state == "passed"):
            info["report"]["stored_verdict_differs"] = True
    return info


def inspect_fusions(path: Path) -> dict[str, Any]:
    """Which fusion rules match where in an ONNX graph, and why the others don't (writes nothing)."""
    import onnx_ir as ir

    from slimline.compile.fusions import UnsupportedGraph, fuse_model, fused_counts
    from slimline.compile.fusions._base import locate
    from slimline.compile.fusions.registry import fused_ops
    from slimline.runtime import quiet

    path = _model_file(path)
    try:
        model = ir.load(str(path))
    except Exception as err:
        raise _unreadable(path, err) from None
    already = fused_counts(model)
    tuned = model.metadata_props.get("slimline.compile.tune", "")  # un-fused on purpose (compile.tune)
    try:
        with quiet():
            result = fuse_model(model)
    except UnsupportedGraph as err:
        raise ModelError(f"{path}: {err}") from None
    matched = [
        {"op": node.op_type, "where": locate(node), "node": node.name} for node in model.graph if node.op_type in fused_ops()
    ]
    return {
        "path": str(path),
        "already_fused": already,
        "fused_after_rules": result.counts,
        "rules": {k: v for k, v in result.steps.items() if v},
        "nodes": {"before": result.nodes_before, "after": result.nodes_after},
        "matched": matched,
        "unfused": result.unfused,
        "tuned": tuned.split("; ") if tuned else [],
    }
