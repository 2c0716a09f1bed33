"""How far decoder artifacts are from their float graph: next-token KL and perplexity change, side by side.

    .venv/bin/python benchmarks/kl_vs_float.py RECIPE RUN_DIR [RUN_DIR ...] [--texts 96] [--heldout 400]

The float graph is the recipe's stages up to its first quantizer (export, fusion), built here as
``slimline sensitivity`` builds it. Each artifact and the float graph then run the same 128-token
windows (batches of 4, empty KV cache): the first ``--texts`` calibration lines (the windows
``slimline sensitivity`` scores on) and the first ``--heldout`` held-out lines. Printed per set: the
mean KL divergence of each artifact's next-token distribution from the float graph's, and its
perplexity change on those windows. The summed per-layer KLs of a sensitivity run estimate the first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from slimline.api import load_recipe
    from slimline.evaluate.llm import log_softmax
    from slimline.measure.data import load_data
    from slimline.measure.inputs import calibration_feeds
    from slimline.models import load_model
    from slimline.runtime import ort_session
    from slimline.stage import Context

    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--texts", type=int, default=96)
    p.add_argument("--heldout", type=int, default=400)
    a = p.parse_args()
    _, recipe = load_recipe(a.recipe, (), None, None)
    data = load_data(recipe.evaluate.data)
    ref = load_model(recipe.model.source, recipe.model.task, None, recipe.model.revision, recipe.model.trust_remote_code)
    work = Path(tempfile.mkdtemp(prefix="kl-vs-float-"))
    try:
        ctx = Context(workdir=work, threads=2, load_data=lambda: data, reference=ref)
        artifact = ref
        for stage in recipe.stages:
            if stage.kind.startswith("quantize."):
                break
            artifact = stage.run(artifact, ctx).artifact
            print(f"float graph: {stage.kind} done", flush=True)
        paths = {"float": Path(artifact.path), **{str(r): r / "model.onnx" for r in a.runs}}
        for label, texts in (("calibration", data.calibration[: a.texts]), ("held-out", data.evaluation[: a.heldout])):
            logp, targets = {}, None
            for name, path in paths.items():
                session = ort_session(path, 2)
                inputs = [i.name for i in session.get_inputs()]
                feeds = calibration_feeds(ref.tokenizer, texts, inputs, batch=4, max_length=128, config=ref.config)
                logp[name] = [
                    log_softmax(session.run(["logits"], {k: v for k, v in f.items() if k in inputs})[0][:, :-1]).astype(
                        np.float32
                    )
                    for f in feeds
                ]
                targets = [f["input_ids"][:, 1:] for f in feeds]
                del session

            def nll(parts: list[np.ndarray], targets: list[np.ndarray] = targets) -> float:
                picked = [np.take_along_axis(x, t[..., None], -1).ravel() for x, t in zip(parts, targets, strict=True)]
                return -float(np.mean(np.concatenate(picked)))

            base = logp.pop("float")
            tokens = sum(t.size for t in targets)
            for name, parts in logp.items():
                kl = np.mean(np.concatenate([(np.exp(f) * (f - q)).sum(-1).ravel() for f, q in zip(base, parts, strict=True)]))
                print(
                    f"{label} ({tokens} tokens) | {name} | KL {kl:.5f} | perplexity change {np.exp(nll(parts) - nll(base)) - 1:+.2%}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
