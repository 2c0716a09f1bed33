"""The stage registry, the runner, and the artifact folder with its manifest.

This module and ``cli.py`` are the only places that know every stage. A run builds its output in a
hidden sibling folder and renames it into place at the very end, so an error or Ctrl-C never leaves a
half-written run where a user (or a CI job) would mistake it for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slimline.artifact import OnnxModel, TorchModel
from slimline.env import host_info, package_versions
from slimline.errors import ModelError, RecipeError
from slimline.family import family_of
from slimline.models.loader import sha256_file as sha256
from slimline.ops import DOMAIN as OPS_DOMAIN
from slimline.ops import OPS, uses_ops
from slimline.preflight import preflight
from slimline.recipe import Recipe
from slimline.runfolder import check_output, make_hidden_dir, make_scratch, make_staging, publish, read_manifest, sweep_stale
from slimline.runtime import SERVING_CONFIG
from slimline.stage import Context, Reporter
from slimline.yamlconf import apply_override

# -- the artifact folder ---------------------------------------------------------------------------


EXTERNAL_ABOVE = 4_000_000  # final models larger than this keep their weights in model.onnx.data (mmap)


def save_final(artifact: Any, folder: Path) -> list[str]:
    """Write the final model and its tokenizer into the artifact folder; returns the files written."""
    if isinstance(artifact, OnnxModel):
        import onnx

        from slimline import onnxfile

        model = onnx.load(str(artifact.path))
        # Weights in model.onnx.data are memory-mapped by ONNX Runtime; inline ones are parsed and then
        # copied, so a 100 MB decoder peaked at 224 MB RSS inline against 86 MB for the same bytes mapped,
        # and MiniLM int8 (24 MB) at 95.7 MB against 79.1 MB at batch 1: only the embedding rows a
        # batch reads become resident. (Above 2 GB protobuf can't hold them inline at all.)
        onnxfile.save(model, folder / "model.onnx", external=model.ByteSize() > EXTERNAL_ABOVE)
        artifact.config.save_pretrained(folder)
    elif isinstance(artifact, TorchModel) and artifact.saved is not None:
        shutil.copytree(artifact.saved, folder / "model")
    elif isinstance(artifact, TorchModel):
        artifact.model.save_pretrained(folder / "model")
    artifact.tokenizer.save_pretrained(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- the runner ------------------------------------------------------------------------------------


def evaluate_artifact(recipe: Recipe, ctx: Context, artifact: Any, folder: Path, reporter: Reporter, name: str) -> dict[str, Any]:
    """The evaluation for the recipe's task (decoder LLMs or encoders); writes report.* into ``folder``."""
    if family_of(recipe.model.task).is_decoder:
        from slimline.evaluate.llm import evaluate_llm

        return evaluate_llm(recipe, ctx, artifact, folder, reporter, name=name)
    from slimline.evaluate.runner import evaluate_run

    return evaluate_run(recipe, ctx, artifact, folder, reporter, name=name)


def run_recipe(
    recipe: Recipe,
    out: Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    recipe_path: str | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Run every stage, save the artifact, evaluate it, and publish the folder. Returns the report.

    Nothing is computed before the output folder, the data, the lengths, the free disk and the free
    memory have been checked (``check_output``, ``preflight``)."""
    reporter = reporter or Reporter()
    out = Path(out)
    seen = check_output(out, force)
    refuse_model(recipe)
    for line in sweep_stale(out.resolve().parent):
        reporter.info(line)
    started = datetime.now(timezone.utc)
    staging = make_staging(out)
    scratch = make_scratch()
    try:
        t0 = time.perf_counter()
        ctx = _context(recipe, scratch, reporter)
        artifact, spec = ctx.reference, recipe.model
        preflight(recipe, ctx, staging, scratch, evaluate=evaluate)
        stages_log: list[dict[str, Any]] = [
            {
                "kind": "model.load",
                "wall_s": round(time.perf_counter() - t0, 2),
                "report": {"source": spec.source, "path": str(artifact.info.path), "pooling": artifact.info.pooling},
            }
        ]

        for i, stage in enumerate(recipe.stages):
            warnings = ctx.begin_stage()
            with reporter.task(f"[{i}] {stage.kind}"):
                t0 = time.perf_counter()
                result = stage.run(artifact, ctx)
                wall = time.perf_counter() - t0
            stages_log.append(
                {
                    "kind": stage.kind,
                    "options": stage.model_dump(mode="json"),
                    "wall_s": round(wall, 2),
                    "report": result.report,
                    "warnings": list(warnings),
                }
            )
            reporter.info(f"{stage.kind} done in {wall:.1f}s")
            artifact = result.artifact

        files = save_final(artifact, staging)
        report = None
        if evaluate:
            t0 = time.perf_counter()
            report = evaluate_artifact(recipe, ctx, artifact, staging, reporter, name=out.name)
            stages_log.append(
                {"kind": "evaluate", "wall_s": round(time.perf_counter() - t0, 2), "report": {"passed": report["passed"]}}
            )
        manifest = {
            "slimline_manifest": 1,
            "run_id": uuid.uuid4().hex,
            "recipe": recipe.model_dump(mode="json"),
            "recipe_path": recipe_path,
            "command": " ".join(sys.argv),
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": package_versions(),
            "host": host_info(ctx.threads),
            "inputs": {"model": spec.source, **artifact.info.provenance, "files": artifact.info.file_hashes},
            "outputs": {f: sha256(staging / f) for f in files + sorted(p.name for p in staging.glob("report.*"))},
            "stages": stages_log,
            "warnings": list(reporter.warnings),
        }
        # the ONNX Runtime settings the figures were measured with: set them where the model is served
        manifest["ort_session_config"] = dict(SERVING_CONFIG)
        if uses_ops(staging / "model.onnx"):  # what a machine needs to load the artifact
            manifest["requires"] = {"custom_ops": f"{OPS_DOMAIN} ({', '.join(OPS)})", "build": "slimline ops build"}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        _, notes = publish(staging, out, seen, force)
        for note in notes:
            reporter.warn(note)
        return report or {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def refuse_model(recipe: Recipe) -> None:
    """Stop before loading anything when the model can't go through this recipe (its files say so)."""
    from slimline.models.describe import refusals

    kinds = {"model.load", *(s.kind for s in recipe.stages)}
    problems = [p for p in refusals(recipe.model.source, recipe.model.task) if p["stage"] in kinds]
    if problems:
        first = problems[0]
        more = f" ({len(problems) - 1} more problem(s): {'; '.join(p['why'] for p in problems[1:])})" if len(problems) > 1 else ""
        raise ModelError(f"model.source `{recipe.model.source}` ({first['stage']}): {first['why']}. Fix: {first['fix']}.{more}")


def load_run_manifest(run_dir: Path) -> dict[str, Any]:
    """A run folder's manifest, checked enough that what reads it can't crash on it."""
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file() or not (run_dir / "model.onnx").is_file():
        raise RecipeError(
            f"{run_dir}: not a run folder with an ONNX artifact (manifest.json and model.onnx). Give a folder written by `slimline run`."
        )
    manifest = read_manifest(run_dir)
    if manifest is None or not isinstance(manifest.get("recipe"), dict):
        raise RecipeError(
            f"{manifest_path}: damaged or not a slimline manifest (it must be a JSON object with `slimline_manifest` and "
            "`recipe`). Run the recipe again to rebuild the folder."
        )
    if not isinstance(manifest.get("stages", []), list):
        raise RecipeError(f"{manifest_path}: `stages` is not a list; the manifest is damaged. Run the recipe again.")
    _check_onnx_file(run_dir / "model.onnx")
    return manifest


def _check_onnx_file(path: Path) -> None:
    """The artifact must at least parse as an ONNX model with a graph (a damaged file is the user's to fix)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
        model = None
    if model is None or not model.graph.node:
        raise ModelError(f"{path}: not a readable ONNX model (empty or damaged). Run the recipe again to rebuild the folder.")


def evaluate_folder(run_dir: Path, overrides: tuple[str, ...] = (), reporter: Reporter | None = None) -> dict[str, Any]:
    """Evaluate a run folder's ONNX artifact again, here: build on one machine (``run --no-eval``),
    measure on the target machine (a GPU host). The recipe comes from the folder's manifest, with
    ``overrides`` (``evaluate.targets=[ort-cuda]``); the reference model is loaded from its source.
    The reports are built in a hidden folder and moved into the run folder when complete, then the
    manifest gains the evaluation: an interrupted evaluation leaves the folder as it was."""
    from slimline import recipe as recipe_mod
    from slimline.artifact import OnnxModel

    reporter = reporter or Reporter()
    run_dir = Path(run_dir)
    manifest = load_run_manifest(run_dir)
    manifest_path = run_dir / "manifest.json"
    raw = json.loads(json.dumps(manifest["recipe"]))  # the manifest keeps the recipe the artifact was built with
    for text in overrides:
        apply_override(raw, text)
    recipe = recipe_mod.from_dict(raw, f"{manifest_path}:recipe")
    if recipe.output_type is not OnnxModel:
        raise RecipeError(f"{run_dir}: its recipe produces a torch model; `slimline evaluate` re-measures ONNX artifacts.")
    for line in sweep_stale(run_dir):
        reporter.info(line)
    scratch = make_scratch()
    staging = make_hidden_dir(run_dir, ".evaluate.partial-")
    try:
        ctx = _context(recipe, scratch, reporter)
        reference = ctx.reference
        preflight(recipe, ctx, staging, scratch, evaluate=True, build=False)
        staged_model = staging / "model.onnx"  # the evaluators read the artifact beside their reports
        staged_model.symlink_to((run_dir / "model.onnx").resolve())
        for data in run_dir.glob("model.onnx.data"):
            (staging / data.name).symlink_to(data.resolve())
        artifact = OnnxModel(staged_model, reference.tokenizer, reference.info, reference.config)
        t0 = time.perf_counter()
        report = evaluate_artifact(recipe, ctx, artifact, staging, reporter, name=run_dir.name)
        manifest.setdefault("stages", []).append(
            {
                "kind": "evaluate",
                "command": " ".join(sys.argv),
                "overrides": list(overrides),
                "host": host_info(ctx.threads),
                "wall_s": round(time.perf_counter() - t0, 2),
                "report": {"passed": report["passed"]},
            }
        )
        outputs = manifest.setdefault("outputs", {})
        if isinstance(outputs, dict):
            outputs.update({p.name: sha256(p) for p in sorted(staging.glob("report.*"))})
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        for path in sorted(staging.glob("report.*")):
            os.replace(path, run_dir / path.name)
        os.replace(staging / "manifest.json", manifest_path)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def _context(recipe: Recipe, scratch: Path, reporter: Reporter) -> Context:
    """The stages' and the evaluation's context: threads set, data loaded on demand, and the source
    model loaded as the reference."""
    from slimline.measure.data import load_data
    from slimline.models import load_model

    threads = recipe.evaluate.threads
    _set_torch_threads(threads)
    data_spec = recipe.evaluate.data
    ctx = Context(workdir=scratch, reporter=reporter, threads=threads, load_data=lambda: load_data(data_spec))
    spec = recipe.model
    reporter.info(f"loading model {spec.source}")
    ctx.reference = load_model(spec.source, spec.task, spec.pooling, spec.revision, spec.trust_remote_code)
    hub = ctx.reference.info.provenance
    if hub and hub.get("hub_revision") != hub.get("hub_commit"):
        reporter.warn(
            f"model.source {spec.source} is not pinned to a commit; it resolved to {hub['hub_commit']}. "
            f"Write hf:{hub['hub_repo']}@{hub['hub_commit']} to get the same files every time."
        )
    return ctx


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
