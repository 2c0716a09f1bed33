"""Evaluating a decoder LLM: perplexity, next-token agreement, prefill and decode speed, memory.

- Perplexity on held-out text (for ``builtin:shakespeare``, plays never used for calibration): the
  evaluation lines are joined into one token stream and scored in windows of ``context`` tokens
  every ``stride`` tokens, each window scoring only the tokens the previous one did not (the
  standard strided evaluation). The fp32 torch model is scored on the same windows.
- Next-token agreement: the share of those scored positions where the artifact's top-1 token equals
  the fp32 model's.
- KL divergence: the mean, over the same scored positions, of KL(fp32 || artifact) between the two
  next-token distributions, in nats. The fp32 model and every target run window by window in one
  pass, so nothing vocabulary-sized is kept. Perplexity's change is not a distance from fp32: on
  Gemma 3 270M an artifact 17% further off by KL (and by agreement) scored 5% lower perplexity than
  one closer to fp32 (docs/models.md). Budgets can bound it (``max_accuracy_drop: {kl_divergence: 0.1}``).
- Prefill: tokens/s for a prompt of each ``prompt_lengths`` at batch 1, and time to first token.
- Decode: tokens/s generating ``new_tokens`` greedily after a ``decode_prompt``-token prompt, at each
  ``decode_batch_sizes``, prefill included, every sequence running to the end (no EOS stop).
  torch fp32 runs HF ``generate`` with its KV cache; the artifact runs slimline's loop. Both are
  timed interleaved (ABBA) in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from slimline.measure.inputs import token_stream
from slimline.measure.timer import cpu_busy, interleave, median


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored index within the window) for strided perplexity over ``n`` tokens.

    Every token but the first is scored exactly once, each with up to ``context - 1`` tokens before it.
    """
    start, scored_to = 0, 1  # token 0 has no context and is never scored
    while scored_to < n:
        end = min(start + context, n)
        yield start, end, scored_to - start
        scored_to = end
        start = min(start + stride, end - 1)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score(logits_fn: Callable[[np.ndarray], np.ndarray], ids: np.ndarray, context: int, stride: int) -> tuple[float, np.ndarray]:
    """Perplexity of ``ids`` and the top-1 prediction at every scored position."""
    ppl, preds, _ = score_against(logits_fn, {}, ids, context, stride)
    return ppl, preds


def score_against(
    reference: Callable[[np.ndarray], np.ndarray],
    others: dict[str, Callable[[np.ndarray], np.ndarray]],
    ids: np.ndarray,
    context: int,
    stride: int,
) -> tuple[float, np.ndarray, dict[str, dict[str, float]]]:
    """``score`` for a reference and several models in one pass over the windows: the reference's
    perplexity and top-1 predictions, and each other's perplexity, top-1 agreement with the reference
    and mean KL(reference || other) per scored token (nats)."""
    ref_nll, count, preds = 0.0, 0, []
    sums = {k: [0.0, 0.0, 0] for k in others}  # nll, kl, agreeing positions
    for start, end, first in windows(len(ids), context, stride):
        chunk = ids[start:end]
        target = chunk[first:]
        at = np.arange(len(target))
        lp0 = log_softmax(reference(chunk[None])[0][first - 1 : -1])
        top = lp0.argmax(-1)
        ref_nll -= float(lp0[at, target].sum())
        count += len(target)
        preds.append(top)
        p0 = np.exp(lp0)
        for name, fn in others.items():
            lp = log_softmax(fn(chunk[None])[0][first - 1 : -1])
            s = sums[name]
            s[0] -= float(lp[at, target].sum())
            s[1] += float((p0 * (lp0 - lp)).sum())
            s[2] += int((lp.argmax(-1) == top).sum())
    n = max(count, 1)
    results = {
        k: {"perplexity": float(np.exp(nll / n)), "next_token_agreement": agree / n, "kl_divergence": max(kl / n, 0.0)}
        for k, (nll, kl, agree) in sums.items()
    }
    return float(np.exp(ref_nll / n)), np.concatenate(preds) if preds else np.zeros(0, np.int64), results


def torch_logits(model: Any, last_only: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """All positions' logits, or (``last_only``, what a prefill before generation needs) the last one's,
    computed where the model's weights are (CPU or GPU) and returned on the host."""
    import torch

    device = next(model.parameters()).device

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(ids).to(device), logits_to_keep=1 if last_only else 0).logits
            return out.float().cpu().numpy()

    return fn


def onnx_logits(decoder: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda ids: decoder.prefill(ids)


# -- speed ---------------------------------------------------------------------------------------


def torch_generate(model: Any, eos: int | None) -> Callable[[np.ndarray, int], int]:
    """Greedy HF generate with its KV cache, never stopping early; returns tokens generated."""
    import torch

    device = next(model.parameters()).device

    def fn(ids: np.ndarray, new: int) -> int:
        t = torch.from_numpy(ids).to(device)
        with torch.inference_mode():
            out = model.generate(
                t,
                attention_mask=torch.ones_like(t),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=eos,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    return fn


def onnx_generate(decoder: Any) -> Callable[[np.ndarray, int], int]:
    from slimline.generate import Sampling

    def fn(ids: np.ndarray, new: int) -> int:
        out = decoder.generate(ids, Sampling(max_new_tokens=new))  # no eos_ids: runs to the end
        return out.shape[0] * out.shape[1]

    return fn


# -- the run's evaluation ------------------------------------------------------------------------


PROVIDERS = {"ort-cpu": ["CPUExecutionProvider"], "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def evaluate_llm(recipe: Any, ctx: Any, artifact: Any, folder: Any, reporter: Any, name: str | None = None) -> dict[str, Any]:
    """Perplexity, agreement, prefill/decode speed and memory of a decoder artifact against torch fp32.

    Each target (``ort-cpu``, ``ort-cuda``) runs the artifact with slimline's loop on its execution
    provider, timed against torch fp32 on the same device (the CPU, or the GPU for ``ort-cuda``).
    The reference perplexity is torch fp32's, computed once; each target scores the artifact again,
    since the CUDA kernels round differently from the CPU ones."""
    import os

    from slimline.evaluate.report import finish_report, report_header
    from slimline.evaluate.runner import folder_size_mb, weight_files
    from slimline.evaluate.targets import available, gpu_name

    spec, g = recipe.evaluate, recipe.evaluate.generation
    reference = ctx.reference
    tokenizer, model = reference.tokenizer, reference.model
    threads = spec.threads or os.cpu_count() or 1
    skipped, targets = [], []
    for target in spec.targets:
        ok, why = available(target)
        if ok and target not in PROVIDERS:
            ok, why = False, "a text-generation artifact is ONNX: it runs on ort-cpu or ort-cuda"
        (targets if ok else skipped).append(target if ok else {"target": target, "reason": why})
        if not ok:
            reporter.warn(f"evaluate: target {target} skipped: {why}")

    ids = token_stream(tokenizer, ctx.data.evaluation, g.perplexity_tokens)
    decoders = {t: _open_decoder(t, model, folder, threads) for t in targets}
    with reporter.task(f"perplexity and KL divergence (torch fp32{''.join(', ' + t for t in targets)})"):
        base_ppl, _, scored = score_against(
            torch_logits(model), {t: onnx_logits(d) for t, d in decoders.items()}, ids, g.context, g.stride
        )
    base_acc = {"perplexity": round(base_ppl, 4), "next_token_agreement": 1.0, "kl_divergence": 0.0}
    base_size = folder_size_mb([p for p in weight_files(reference.info.path) if p.suffix != ".onnx"])
    art_size = folder_size_mb(weight_files(folder))
    busy = cpu_busy() if spec.speed.enabled else None
    rows: list[dict[str, Any]] = []
    summary: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    for target in targets:
        acc = {
            "perplexity": round(scored[target]["perplexity"], 4),
            "next_token_agreement": round(scored[target]["next_token_agreement"], 5),
            "kl_divergence": round(scored[target]["kl_divergence"], 5),
        }
        t_rows, probes = _evaluate_target(
            target, decoders.pop(target), model, tokenizer, reference.info.path, folder, ids, spec, threads, reporter
        )
        for r in t_rows:
            r.update(
                {
                    "peak_rss_mb": probes.get(r["variant"], {}).get("peak_rss_mb"),
                    "peak_gpu_mb": probes.get(r["variant"], {}).get("gpu_device_mb"),
                    "size_mb": base_size if r["variant"] == "baseline" else art_size,
                    "accuracy": base_acc if r["variant"] == "baseline" else acc,
                }
            )
        rows += t_rows
        mine = [r for r in t_rows if r["variant"] == "compressed"]
        decode_b1 = next((r for r in mine if r["mode"] == "decode" and r["batch_size"] == 1), None)
        summary[target] = {
            "accuracy": acc,
            "baseline_accuracy": base_acc,
            "perplexity_increase": round(acc["perplexity"] / base_ppl - 1, 5),
            "speedup": decode_b1["speedup"] if decode_b1 else None,
            "speedup_batch_size": 1 if decode_b1 else None,
            "decode_tokens_per_s": {str(r["batch_size"]): r["throughput_per_s"] for r in mine if r["mode"] == "decode"},
            "prefill_tokens_per_s": {str(r["seq_len"]): r["throughput_per_s"] for r in mine if r["mode"] == "prefill"},
            "time_to_first_token_ms": {str(r["seq_len"]): r["latency_ms_p50"] for r in mine if r["mode"] == "prefill"},
            "size_mb": art_size,
            "peak_rss_mb": probes.get("compressed", {}).get("peak_rss_mb"),
            "peak_gpu_mb": probes.get("compressed", {}).get("gpu_device_mb"),
        }
        extra = probes.get("extra", {})
        if "placement" in extra:
            summary[target]["cpu_fallback_nodes"] = extra["placement"]["cpu_fallback_nodes"]
        cuda = target == "ort-cuda"
        details[f"baseline@{'torch-cuda' if cuda else 'torch-cpu'}"] = {
            "library": "torch fp32 (HF generate, KV cache)",
            **({"device": gpu_name()} if cuda else {}),
        }
        details[f"compressed@{target}"] = {
            "library": "onnxruntime + slimline generate loop",
            "provider": PROVIDERS[target][0],
            **({"device": gpu_name(), "cache": "KV cache in GPU memory (IO binding)"} if cuda else {}),
            **{k: v for k, v in extra.items() if k != "placement"},
            **(
                {"placement": {k: v for k, v in extra["placement"].items() if k != "cpu_fallback_nodes"}}
                if "placement" in extra
                else {}
            ),
        }
    if not rows:
        rows = [_row(v, "-", "accuracy", None, None, None, None, {}) for v in ("baseline", "compressed")]
        for r in rows:  # no target ran: the artifact was never scored
            base = r["variant"] == "baseline"
            r.update({"size_mb": base_size if base else art_size, "accuracy": base_acc if base else {}})
    report = {
        **report_header(recipe, name, folder, reference.info.source, "text-generation", ctx.data, threads),
        "targets": details,
        "skipped_targets": skipped,
        "measurement": {
            "perplexity": f"{len(ids)} held-out tokens, windows of {g.context} every {g.stride} (only new tokens scored)",
            "next_token_agreement": "share of scored positions whose top-1 token equals torch fp32's",
            "kl_divergence": "mean KL(torch fp32 || artifact) of the next-token distributions over the scored positions, nats",
            "prefill": f"batch 1, prompts of {g.prompt_lengths} tokens; throughput = prompt tokens / median time; latency p50 = time to first token",
            "decode": f"greedy, {g.new_tokens} new tokens after a {g.decode_prompt}-token prompt, prefill included, batch sizes {g.decode_batch_sizes}; throughput = generated tokens / median time",
            "speed": "same process, baseline and compressed interleaved (ABBA) on each target's device; throughput_per_s is tokens/s",
            "threads": threads,
            "cpu_busy_by_others_before": busy,
            "memory": "peak RSS (VmHWM) of a fresh process that loads the model and runs a 128-token prefill "
            "(last position's logits only, as before generation); on a GPU also the device memory the driver "
            "shows for that process",
        },
        "results": rows,
        "summary": summary,
    }
    return finish_report(report, spec, folder)


def _open_decoder(target: str, model: Any, folder: Any, threads: int) -> Any:
    from slimline.generate import OnnxDecoder

    decoder = OnnxDecoder(
        folder / "model.onnx", threads, PROVIDERS[target], max_context=getattr(model.config, "max_position_embeddings", None)
    )
    if target == "ort-cuda" and decoder.device != "cuda":
        raise RuntimeError(f"ONNX Runtime fell back to {decoder.session.get_providers()} instead of the CUDA EP")
    return decoder


def _evaluate_target(
    target: str,
    decoder: Any,
    model: Any,
    tokenizer: Any,
    reference_path: Any,
    folder: Any,
    ids: np.ndarray,
    spec: Any,
    threads: int,
    reporter: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One target's rows (speed against torch fp32 on the same device) and memory probes."""
    from slimline.evaluate import memory
    from slimline.generate import OnnxDecoder, eos_ids

    g = spec.generation
    cuda = target == "ort-cuda"
    extra: dict[str, Any] = {}
    if cuda:
        extra["placement"] = decode_step_placement(folder / "model.onnx", decoder, threads)
        if extra["placement"]["cpu_fallback_nodes"]:
            reporter.warn(
                f"evaluate: ONNX Runtime placed {len(extra['placement']['cpu_fallback_nodes'])} compute nodes on the CPU EP "
                f"instead of CUDA: {', '.join(extra['placement']['cpu_fallback_nodes'][:8])}"
            )
    stepper = decoder
    if cuda and g.cuda_graph:
        from slimline.generate import Sampling

        try:
            graphed = OnnxDecoder(folder / "model.onnx", threads, PROVIDERS[target], decoder.max_context, cuda_graph=True)
            trial = ids[:16][None]  # capture, replay, and the same greedy tokens as the plain loop, or no graph
            want = decoder.generate(trial, Sampling(max_new_tokens=8))
            if graphed.generate(trial, Sampling(max_new_tokens=8)).tolist() != want.tolist():
                raise RuntimeError("its greedy tokens differed from the plain loop's on a trial prompt")
            stepper = graphed
            extra["cuda_graph"] = "decode steps replayed as one CUDA graph each"
        except Exception as e:  # noqa: BLE001 - ORT refuses graph capture for some graphs (nodes off the GPU)
            extra["cuda_graph"] = f"not used: {str(e).splitlines()[0][:200]}"
            reporter.warn(f"evaluate: cuda_graph: {extra['cuda_graph']}")
    rng = np.random.default_rng(0)

    def prompt(batch: int, length: int) -> np.ndarray:
        return np.stack([ids[s : s + length] for s in rng.integers(0, max(len(ids) - length, 1), size=batch)])

    rows: list[dict[str, Any]] = []
    base_target = "torch-cuda" if cuda else "torch-cpu"
    home = next(model.parameters()).device
    if spec.speed.enabled:
        if cuda:
            model.to("cuda")
        try:
            torch_gen, onnx_gen = (
                torch_generate(model, next(iter(eos_ids(tokenizer, model.config)), None)),
                onnx_generate(stepper),
            )
            repeats = max(1, min(spec.speed.repeats, 5))
            first = torch_logits(model, last_only=True)  # time to first token: the last position's logits only
            for length in g.prompt_lengths:
                p = prompt(1, length)
                fns = {"baseline": lambda p=p: first(p), "compressed": lambda p=p: decoder.prefill(p, last_only=True)}
                with reporter.task(f"prefill {length} tokens ({target})"):
                    t = interleave(fns, repeats, warmup=1)
                for variant in ("baseline", "compressed"):
                    where = base_target if variant == "baseline" else target
                    rows.append(
                        _row(variant, where, "prefill", 1, length, length / median(t[variant]), median(t[variant]) * 1000, t)
                    )
            for batch in g.decode_batch_sizes:
                p = prompt(batch, g.decode_prompt)
                fns = {"baseline": lambda p=p: torch_gen(p, g.new_tokens), "compressed": lambda p=p: onnx_gen(p, g.new_tokens)}
                with reporter.task(f"decode b{batch}, {g.new_tokens} new tokens ({target})"):
                    t = interleave(fns, max(1, min(repeats, 3)), warmup=1)
                for variant in ("baseline", "compressed"):
                    where = base_target if variant == "baseline" else target
                    rows.append(
                        _row(variant, where, "decode", batch, g.decode_prompt, batch * g.new_tokens / median(t[variant]), None, t)
                    )
        finally:
            model.to(home)
        for r in rows:
            base = next(
                b
                for b in rows
                if b["variant"] == "baseline"
                and (b["mode"], b["batch_size"], b["seq_len"]) == (r["mode"], r["batch_size"], r["seq_len"])
            )
            r["speedup"] = round(r["throughput_per_s"] / base["throughput_per_s"], 3)
    else:
        rows = [
            _row(v, base_target if v == "baseline" else target, "accuracy", None, None, None, None, {})
            for v in ("baseline", "compressed")
        ]
    probes = {}
    if spec.memory:
        with reporter.task(f"peak memory ({target}, fresh processes)"):
            probes["baseline"] = memory.measure(
                "torch-cuda" if cuda else "torch", reference_path, task="text-generation", threads=threads
            )
            probes["compressed"] = memory.measure(
                "onnx-cuda" if cuda else "onnx", folder / "model.onnx", task="text-generation", threads=threads
            )
        for k, v in probes.items():
            if "error" in v:
                reporter.warn(f"evaluate: {target} {k}: {v['error']}")
    probes["extra"] = extra
    return rows, probes


def decode_step_placement(path: Any, decoder: Any, threads: int) -> dict[str, Any]:
    """Each node's provider for one decode step (a past of 8 positions: CUDA's GroupQueryAttention refuses
    an empty one), from ONNX Runtime's profile (slimline.evaluate.placement)."""
    from slimline.evaluate.placement import placement

    past = 8
    feeds = {
        "input_ids": np.array([[1]], np.int64),
        "attention_mask": np.ones((1, past + 1), np.int64),
        "position_ids": np.array([[past]], np.int64),
        **{n: np.zeros((1, decoder.kv_heads, past, decoder.head_dim), decoder.cache_dtype) for n in decoder.past_names},
    }
    try:
        return placement(path, list(PROVIDERS["ort-cuda"]), feeds, threads).summary()
    except Exception as e:  # noqa: BLE001 - a profile ORT didn't write: say so rather than guess
        return {"error": str(e).splitlines()[0][:200], "cpu_fallback_nodes": []}


def _row(
    variant: str,
    target: str,
    mode: str,
    batch: int | None,
    seq_len: int | None,
    throughput: float | None,
    ttft_ms: float | None,
    times: dict,
) -> dict[str, Any]:
    secs = times.get(variant, [])
    return {
        "variant": variant,
        "target": target,
        "device": "cuda" if target.endswith("cuda") else "cpu",
        "mode": mode,
        "batch_size": batch,
        "seq_len": seq_len,
        "latency_ms_p50": round(ttft_ms, 2) if ttft_ms is not None else (round(median(secs) * 1000, 2) if secs else None),
        "latency_ms_p95": round(float(np.percentile(secs, 95)) * 1000, 2) if secs else None,
        "latency_ms_p99": None,
        "throughput_per_s": round(throughput, 2) if throughput is not None else None,
        "speedup": None,
        "peak_rss_mb": None,
        "peak_gpu_mb": None,
    }
