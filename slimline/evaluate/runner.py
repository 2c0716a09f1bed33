"""Evaluate a run: fidelity, speed and memory of the artifact against the torch fp32 original."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from slimline.artifact import TorchModel
from slimline.env import host_info
from slimline.evaluate import fidelity as fid
from slimline.evaluate import memory, speed
from slimline.evaluate.budgets import check_budgets
from slimline.evaluate.report import REPORT_SCHEMA, write_reports
from slimline.evaluate.targets import Runner, available, ort_runner, torch_runner
from slimline.stage import Context, Reporter

WEIGHT_FILES = (".safetensors", ".bin", ".onnx", ".data", ".pt")


def folder_size_mb(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 1e6, 2)


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in WEIGHT_FILES or p.name.endswith(".onnx.data")]


def _compressed_runner(target: str, artifact: Any, folder: Path, threads: int) -> Runner:
    if target == "ort-cpu":
        return ort_runner(folder / "model.onnx", f"compressed@{target}", threads)
    return torch_runner(artifact.model, f"compressed@{target}", threads)


def evaluate_run(
    recipe: Any, ctx: Context, artifact: Any, folder: Path, reporter: Reporter, name: str | None = None
) -> dict[str, Any]:
    """Measure, check budgets, write report.json and report.md into ``folder``; return the report."""
    spec = recipe.evaluate
    reference: TorchModel = ctx.reference
    info, tok = reference.info, reference.tokenizer
    data = ctx.data
    threads = spec.threads or os.cpu_count() or 1

    baseline = torch_runner(reference.model, "baseline", threads)
    runners, skipped = [], []
    for target in spec.targets:
        ok, why = available(target)
        if ok:
            runners.append(_compressed_runner(target, artifact, folder, threads))
        else:
            skipped.append({"target": target, "reason": why})
            reporter.warn(f"evaluate: target {target} skipped: {why}")

    # -- accuracy -------------------------------------------------------------------------------
    texts = data.evaluation
    accuracy: dict[str, dict[str, float]] = {}
    with reporter.task("fidelity (fp32 reference)", total=len(texts)) as step:
        ref = fid.encode(baseline, tok, texts, info.task, info.pooling, spec.data.max_length, step)
    base_acc: dict[str, float] = {"mean_cosine": 1.0, "min_cosine": 1.0}
    if info.task == "feature-extraction":
        base_acc[f"top{fid.TOP_K}_overlap"] = 1.0
    pairs_ref = None
    if data.pairs:
        pairs_ref = [
            fid.encode(baseline, tok, [p[j] for p in data.pairs], info.task, info.pooling, spec.data.max_length) for j in (0, 1)
        ]
        base_acc["spearman"] = fid.pair_spearman(*pairs_ref, data.pair_scores)
    if data.labels and info.task == "text-classification":
        base_acc["accuracy"] = float(np.mean(ref.argmax(-1) == np.asarray(data.labels)))
    accuracy["baseline"] = base_acc
    for runner in runners:
        with reporter.task(f"fidelity ({runner.target})", total=len(texts)) as step:
            vecs = fid.encode(runner, tok, texts, info.task, info.pooling, spec.data.max_length, step)
        acc = fid.fidelity(ref, vecs, info.task)
        if pairs_ref is not None:
            pair_vecs = [
                fid.encode(runner, tok, [p[j] for p in data.pairs], info.task, info.pooling, spec.data.max_length) for j in (0, 1)
            ]
            acc["spearman"] = fid.pair_spearman(*pair_vecs, data.pair_scores)
        if data.labels and info.task == "text-classification":
            acc["accuracy"] = float(np.mean(vecs.argmax(-1) == np.asarray(data.labels)))
        accuracy[runner.name] = {k: round(v, 5) for k, v in acc.items()}

    # -- speed ------------------------------------------------------------------------------------
    timings: dict[int, dict[str, dict[str, float]]] = {}
    busy_before = busy_after = None
    if spec.speed.enabled and runners:
        busy_before = speed.cpu_busy()
        if busy_before is not None and busy_before > 0.15:
            reporter.warn(
                f"evaluate: other processes keep {busy_before:.0%} of the CPUs busy; speed figures will be noisy "
                "(ratios still compare like with like, since variants are interleaved)."
            )
        everyone = [baseline, *runners]
        for batch in spec.speed.batch_sizes:
            feeds = speed.fixed_batch(tok, texts, batch, spec.speed.seq_len)
            with reporter.task(f"speed b{batch} s{spec.speed.seq_len}", total=spec.speed.repeats * len(everyone)) as step:
                secs = speed.time_interleaved(everyone, feeds, spec.speed.warmup, spec.speed.repeats, step)
            timings[batch] = {name: speed.summarize(s, batch) for name, s in secs.items()}
        busy_after = speed.cpu_busy()

    # -- memory and size --------------------------------------------------------------------------
    base_size = folder_size_mb([p for p in weight_files(info.path) if p.suffix != ".onnx"])
    art_size = folder_size_mb(weight_files(folder))
    rss: dict[str, Any] = {}
    if spec.memory:
        with reporter.task("peak RSS (fresh processes)", total=1 + len(runners)) as step:
            rss["baseline"] = memory.measure("torch", info.path, task=info.task, threads=threads)
            step.advance()
            for runner in runners:
                kind, path = ("onnx", folder / "model.onnx") if runner.target.startswith("ort") else ("torch", folder / "model")
                rss[runner.name] = memory.measure(kind, path, task=info.task, threads=threads)
                step.advance()
        for name, value in rss.items():
            if "error" in value:
                reporter.warn(f"evaluate: {name}: {value['error']}")

    # -- rows, summary, budgets -------------------------------------------------------------------
    rows = []
    for runner in [baseline, *runners]:
        variant = "baseline" if runner is baseline else "compressed"
        for batch in spec.speed.batch_sizes if timings else [None]:
            row = {
                "variant": variant,
                "target": runner.target,
                "batch_size": batch,
                "seq_len": spec.speed.seq_len if timings else None,
                "latency_ms_p50": None,
                "latency_ms_p95": None,
                "throughput_per_s": None,
                "speedup": None,
                "peak_rss_mb": rss.get(runner.name, {}).get("peak_rss_mb"),
                "size_mb": base_size if runner is baseline else art_size,
                "accuracy": accuracy[runner.name],
            }
            if batch is not None:
                row.update(timings[batch][runner.name])
                base_tp = timings[batch]["baseline"]["throughput_per_s"]
                row["speedup"] = round(row["throughput_per_s"] / base_tp, 3) if base_tp else None
            rows.append(row)

    largest = max(spec.speed.batch_sizes)
    summary = {}
    for runner in runners:
        acc = accuracy[runner.name]
        summary[runner.target] = {
            "fidelity_drop": round(1 - acc["mean_cosine"], 5),
            "mean_cosine": acc["mean_cosine"],
            "top10_overlap": acc.get("top10_overlap"),
            "speedup": next(
                (
                    r["speedup"]
                    for r in rows
                    if r["target"] == runner.target and r["batch_size"] == largest and r["variant"] == "compressed"
                ),
                None,
            ),
            "speedup_batch_size": largest if timings else None,
            "size_mb": art_size,
            "peak_rss_mb": rss.get(runner.name, {}).get("peak_rss_mb"),
        }
    budgets = check_budgets(spec.budgets.model_dump(), summary)
    report = {
        "schema_version": REPORT_SCHEMA,
        "recipe": recipe.name,
        "artifact": name or folder.name,
        "model": info.source,
        "task": info.task,
        "data": data.describe(),
        "host": host_info(threads),
        "targets": {r.target: r.details for r in [baseline, *runners]},
        "skipped_targets": skipped,
        "measurement": {
            "speed": "same process, variants interleaved in ABBA order; median (p50) and p95 of repeats",
            "warmup": spec.speed.warmup,
            "repeats": spec.speed.repeats,
            "threads": threads,
            "inputs": f"real texts padded to {spec.speed.seq_len} tokens",
            "cpu_busy_by_others_before": busy_before,
            "cpu_busy_by_others_after": busy_after,
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "memory": "peak RSS (VmHWM) of a fresh process that loads the model and runs batch 1",
            "fidelity": f"{len(texts)} evaluation texts, dynamic padding, max_length {spec.data.max_length}",
        },
        "results": rows,
        "summary": summary,
        "budgets": budgets,
        "passed": all(b["passed"] for b in budgets),
    }
    write_reports(report, folder)
    return report
