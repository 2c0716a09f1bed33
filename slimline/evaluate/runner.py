"""Evaluate a run: accuracy, speed and memory of the artifact against the torch fp32 original.

Speed is compared per device: CPU targets against torch fp32 on the CPU, CUDA targets against torch
fp32 on the GPU, each group timed interleaved in this process. Accuracy is always against the fp32
model on the CPU, the reference the user fine-tuned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from slimline.evaluate import memory, speed
from slimline.evaluate.fidelity import encode, word_predictions
from slimline.evaluate.report import finish_report, report_header
from slimline.evaluate.targets import TARGET_DEVICE, Runner, available, ort_runner, torch_runner
from slimline.family import family_of
from slimline.measure import metrics
from slimline.measure.inputs import fixed_batch, traffic_batches
from slimline.measure.timer import cpu_busy, summarize
from slimline.stage import Context, Reporter

WEIGHT_FILES = (".safetensors", ".bin", ".onnx", ".data", ".pt")
PROBE_KIND = {"torch-cpu": "torch", "torch-cuda": "torch-cuda", "ort-cpu": "onnx", "ort-cuda": "onnx-cuda"}


def folder_size_mb(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths if p.is_file()) / 1e6, 2)


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix in WEIGHT_FILES]


def _compressed_runner(target: str, artifact: Any, folder: Path, threads: int) -> Runner:
    name = f"compressed@{target}"
    if target.startswith("ort"):
        return ort_runner(folder / "model.onnx", name, threads, target)
    model = artifact.model
    if TARGET_DEVICE[target] == "cuda" and getattr(artifact, "load_on", None) and getattr(model, "is_quantized", False):
        model = artifact.load_on("cuda")  # bitsandbytes: built again on the GPU, since it can't be moved
    return torch_runner(model, name, threads, target)


def _accuracy(
    runner: Runner, ref: np.ndarray | None, ctx_data: Any, info: Any, max_length: int, reporter: Reporter
) -> tuple[dict, np.ndarray]:
    texts = ctx_data.evaluation
    with reporter.task(f"accuracy ({runner.name})", total=len(texts)) as step:
        vecs = encode(runner, info.tokenizer, texts, info.family, info.pooling, max_length, step)
    acc = metrics.fidelity(ref if ref is not None else vecs, vecs, info.family.vectors)
    if ctx_data.pairs:
        a, b = ([p[j] for p in ctx_data.pairs] for j in (0, 1))
        va = encode(runner, info.tokenizer, a, info.family, info.pooling, max_length)
        vb = encode(runner, info.tokenizer, b, info.family, info.pooling, max_length)
        acc["spearman"] = metrics.pair_spearman(va, vb, ctx_data.pair_scores)
    if ctx_data.labels and info.family.vectors == "logits":
        acc.update(metrics.classification(vecs.argmax(-1), np.asarray(ctx_data.labels)))
    if ctx_data.labels and ctx_data.words and info.family.vectors == "token-logits":
        predicted = word_predictions(runner, info.tokenizer, ctx_data.words, max_length)
        pred = np.concatenate(predicted)
        gold = np.concatenate([np.asarray(row) for row in ctx_data.labels])
        scored = pred >= 0  # words past max_length are not scored
        acc.update(metrics.classification(pred[scored], gold[scored]))
        acc["scored_words"] = float(scored.sum())
    return {k: round(float(v), 6) for k, v in acc.items()}, vecs


class _Info:
    def __init__(self, reference: Any) -> None:
        self.tokenizer, self.task, self.pooling = reference.tokenizer, reference.info.task, reference.info.pooling
        self.family = family_of(self.task)


def evaluate_run(
    recipe: Any, ctx: Context, artifact: Any, folder: Path, reporter: Reporter, name: str | None = None
) -> dict[str, Any]:
    """Measure, check budgets, write the reports into ``folder``; return the report."""
    spec = recipe.evaluate
    reference = ctx.reference
    info = _Info(reference)
    data = ctx.data
    threads = spec.threads or os.cpu_count() or 1
    max_length = spec.data.max_length

    runners, skipped = [], []
    for target in spec.targets:
        ok, why = available(target)
        if ok:
            try:
                runners.append(_compressed_runner(target, artifact, folder, threads))
            except RuntimeError as err:
                ok, why = False, str(err)
        if not ok:
            skipped.append({"target": target, "reason": why})
            reporter.warn(f"evaluate: target {target} skipped: {why}")
    devices = sorted({r.device for r in runners}) or ["cpu"]
    baselines = {d: torch_runner(reference.model, f"baseline@torch-{d}", threads, f"torch-{d}") for d in devices}

    # -- accuracy (against the fp32 model on the CPU) ---------------------------------------------
    base_acc, ref = _accuracy(
        baselines.get("cpu") or torch_runner(reference.model, "baseline@torch-cpu", threads),
        None,
        data,
        info,
        max_length,
        reporter,
    )
    accuracy = {b.name: base_acc for b in baselines.values()}
    for runner in runners:
        accuracy[runner.name], _ = _accuracy(runner, ref, data, info, max_length, reporter)

    # -- speed, per device, interleaved -----------------------------------------------------------
    fixed: dict[tuple[str, int], dict[str, float]] = {}
    traffic: dict[str, dict[str, float]] = {}
    busy_before = busy_after = None
    if spec.speed.enabled and runners:
        busy_before = cpu_busy()
        if busy_before is not None and busy_before > 0.15:
            reporter.warn(
                f"evaluate: other processes keep {busy_before:.0%} of the CPUs busy; speed figures will be noisy "
                "(ratios still compare like with like, since variants are interleaved)."
            )
        for device in devices:
            group = [baselines[device], *[r for r in runners if r.device == device]]
            for batch in spec.speed.batch_sizes:
                feeds = fixed_batch(info.tokenizer, data.evaluation, batch, spec.speed.seq_len)
                with reporter.task(
                    f"speed {device} b{batch} s{spec.speed.seq_len}", total=spec.speed.repeats * len(group)
                ) as step:
                    secs = speed.time_runners(group, feeds, spec.speed.warmup, spec.speed.repeats, step)
                for runner_name, s in secs.items():
                    fixed[(runner_name, batch)] = summarize(s, batch)
            if spec.speed.traffic:
                texts = data.evaluation[: spec.speed.traffic_texts]
                batches = traffic_batches(info.tokenizer, texts, spec.speed.traffic_batch_size, max_length)
                passes = max(1, min(3, spec.speed.repeats))
                with reporter.task(
                    f"real traffic {device} ({len(texts)} texts)", total=passes * len(batches) * len(group)
                ) as step:
                    timed = speed.time_traffic(group, batches, passes, step)
                for runner_name, t in timed.items():
                    row = summarize(t["batch_s"], spec.speed.traffic_batch_size)
                    row["throughput_per_s"] = round(len(texts) / float(np.median(t["pass_s"])), 2)
                    traffic[runner_name] = row
        busy_after = cpu_busy()

    # -- memory and size ------------------------------------------------------------------------
    base_size = folder_size_mb([p for p in weight_files(reference.info.path) if p.suffix != ".onnx"])
    art_size = folder_size_mb(weight_files(folder))
    probes: dict[str, dict[str, Any]] = {}
    if spec.memory:
        everyone = [*baselines.values(), *runners]
        with reporter.task("peak memory (fresh processes)", total=len(everyone)) as step:
            for runner in everyone:
                if runner.name.startswith("baseline"):
                    path = reference.info.path
                else:
                    path = folder / "model.onnx" if runner.target.startswith("ort") else folder / "model"
                probes[runner.name] = memory.measure(
                    PROBE_KIND[runner.target], path, task=info.task, seq_len=spec.speed.seq_len, threads=threads
                )
                if "error" in probes[runner.name]:
                    reporter.warn(f"evaluate: {runner.name}: {probes[runner.name]['error']}")
                step.advance()

    # -- rows, summary, budgets -----------------------------------------------------------------
    rows = []
    for runner in [*baselines.values(), *runners]:
        is_base = runner.name.startswith("baseline")
        base_name = baselines[runner.device].name
        common = {
            "variant": "baseline" if is_base else "compressed",
            "target": runner.target,
            "device": runner.details.get("device"),
            "peak_rss_mb": probes.get(runner.name, {}).get("peak_rss_mb"),
            "peak_gpu_mb": probes.get(runner.name, {}).get("gpu_device_mb"),
            "size_mb": base_size if is_base else art_size,
            "accuracy": accuracy[runner.name],
        }
        measured = [
            ("fixed", b, spec.speed.seq_len, fixed.get((runner.name, b)), fixed.get((base_name, b)))
            for b in spec.speed.batch_sizes
        ]
        measured.append(("traffic", spec.speed.traffic_batch_size, None, traffic.get(runner.name), traffic.get(base_name)))
        for mode, batch, seq_len, figures, base in measured:
            if figures is None and (mode == "traffic" or fixed):
                continue
            row = {
                "mode": mode,
                "batch_size": batch if figures else None,
                "seq_len": seq_len if figures else None,
                "latency_ms_p50": None,
                "latency_ms_p95": None,
                "latency_ms_p99": None,
                "throughput_per_s": None,
                "speedup": None,
                **common,
            }
            if figures:
                row.update(figures)
                row["speedup"] = (
                    round(figures["throughput_per_s"] / base["throughput_per_s"], 3)
                    if base and base["throughput_per_s"]
                    else None
                )
            rows.append(row)

    largest = max(spec.speed.batch_sizes)
    summary = {}
    for runner in runners:
        mine = [r for r in rows if r["target"] == runner.target and r["variant"] == "compressed"]
        acc = accuracy[runner.name]
        summary[runner.target] = {
            "accuracy": acc,
            "baseline_accuracy": base_acc,
            "mean_cosine": acc.get("mean_cosine"),
            "fidelity_drop": round(1 - acc["mean_cosine"], 6) if "mean_cosine" in acc else None,
            "top10_overlap": acc.get("top10_overlap"),
            "speedup": next((r["speedup"] for r in mine if r["mode"] == "fixed" and r["batch_size"] == largest), None),
            "speedup_batch_size": largest if fixed else None,
            "traffic_speedup": next((r["speedup"] for r in mine if r["mode"] == "traffic"), None),
            "latency_ms_p95": {
                str(r["batch_size"]): r["latency_ms_p95"]
                for r in mine
                if r["mode"] == "fixed" and r["latency_ms_p95"] is not None
            },
            "size_mb": art_size,
            "peak_rss_mb": probes.get(runner.name, {}).get("peak_rss_mb"),
            "peak_gpu_mb": probes.get(runner.name, {}).get("gpu_device_mb"),
        }
        if "cpu_fallback_nodes" in runner.details:  # a GPU target: the nodes ONNX Runtime ran on the CPU
            summary[runner.target]["cpu_fallback_nodes"] = runner.details["cpu_fallback_nodes"]
    report = {
        **report_header(recipe, name, folder, reference.info.source, info.task, data, threads),
        "targets": {r.name: r.details for r in [*baselines.values(), *runners]},
        "skipped_targets": skipped,
        "measurement": {
            "speed": "same process; baseline and compressed interleaved run by run in ABBA order, per device",
            "warmup": spec.speed.warmup,
            "repeats": spec.speed.repeats,
            "threads": threads,
            "fixed_inputs": f"real texts padded to {spec.speed.seq_len} tokens, batch sizes {spec.speed.batch_sizes}",
            "traffic": (
                f"first {spec.speed.traffic_texts} evaluation texts in arrival order, batches of {spec.speed.traffic_batch_size} "
                "padded to their longest text; throughput = texts / median pass time; host-device copies included"
            )
            if spec.speed.traffic
            else "off",
            "percentiles": "p50/p95/p99 over the timed runs (with few repeats, p99 is close to the maximum)",
            "cpu_busy_by_others_before": busy_before,
            "cpu_busy_by_others_after": busy_after,
            "memory": f"peak RSS (VmHWM) of a fresh process that loads the model and runs batch 1 x {spec.speed.seq_len} "
            "tokens; on CUDA also the process's device memory from nvidia-smi",
            "accuracy": f"{len(data.evaluation)} evaluation texts against torch fp32 on the CPU, dynamic padding, max_length {max_length}",
        },
        "results": rows,
        "summary": summary,
    }
    return finish_report(report, spec, folder)
