"""Peak memory of a fresh process that loads a model and runs one batch.

Measured in a child process (``python -m slimline.evaluate.memory``), because the evaluating process
already holds torch, both models and the data: its own RSS says nothing about what serving costs.
"""

from __future__ import annotations

import inspect
import json
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (VmHWM where Linux has it)."""
    # VmHWM is per address space, so it starts afresh at exec; ru_maxrss would carry over the
    # parent's peak (Linux keeps it across execve).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    kind: str,
    path: Path,
    *,
    task: str = "feature-extraction",
    batch: int = 1,
    seq_len: int = 128,
    threads: int = 0,
    timeout: float = 300,
) -> dict:
    """Peak RSS (MB) of ``python -m slimline.evaluate.memory`` loading ``path`` and running one batch."""
    cmd = [
        sys.executable,
        "-m",
        "slimline.evaluate.memory",
        kind,
        str(path),
        "--task",
        task,
        "--batch",
        str(batch),
        "--seq-len",
        str(seq_len),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory probe failed: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inputs(path: Path, batch: int, seq_len: int) -> dict:
    """A real sentence padded to ``seq_len``, tokenized with the light ``tokenizers`` library (as a
    server would), so that the probe's own imports don't inflate the figure."""
    import numpy as np

    folder = path if path.is_dir() else path.parent
    candidates = [folder / "tokenizer.json", folder.parent / "tokenizer.json"]
    tok_file = next((c for c in candidates if c.is_file()), None)
    if tok_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        tok.enable_truncation(seq_len)
        tok.enable_padding(length=seq_len)
        enc = tok.encode_batch(["Now is the winter of our discontent made glorious summer by this sun of York"] * batch)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    else:  # no tokenizer: small ids exist in every vocabulary
        ids = np.ones((batch, seq_len), dtype=np.int64)
        mask = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _gpu_process_mb() -> float | None:
    """Device memory held by this process, as the driver sees it (context + allocator + arenas)."""
    import os
    import shutil

    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in out.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used.strip())
    return None


def _probe(kind: str, path: str, task: str, batch: int, seq_len: int, threads: int) -> dict:
    import numpy as np

    feeds = _inputs(Path(path), batch, seq_len)
    result: dict = {}
    if kind in ("onnx", "onnx-cuda"):
        from slimline.runtime import float_dtype, ort_session

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if kind == "onnx-cuda" else None
        session = ort_session(Path(path), threads, providers)
        for i in session.get_inputs():  # a decoder graph: positions and an empty KV cache (a prefill)
            if i.name == "position_ids":
                feeds[i.name] = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, seq_len)).copy()
            elif i.name.startswith("past_key_values."):
                from slimline.generate import kv_dims

                kv, hd = kv_dims(i.shape, Path(path).parent)
                feeds[i.name] = np.zeros((batch, kv, 0, hd), float_dtype(i))
        names = [i.name for i in session.get_inputs()]
        feeds = {k: feeds[k] for k in names}
        from slimline.generate import keeps_last_logits
        from slimline.measure.inputs import LOGITS_TO_KEEP

        if keeps_last_logits(session):
            feeds[LOGITS_TO_KEEP] = np.array([1], np.int64)  # a prefill before generation, as `generate` runs it
            result["logits"] = "last position"
        session.run(None, feeds)
    else:
        import torch

        from slimline.family import family_of

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if kind == "torch-cuda" else "cpu"
        family = family_of(task)
        model = family.auto_class().from_pretrained(path).eval()
        if not getattr(model, "is_quantized", False):  # bitsandbytes models refuse .to() and load in place
            model = model.to(device)
        accepted = set(inspect.signature(model.forward).parameters)
        extra = {}
        if family.is_decoder and "logits_to_keep" in accepted:
            extra["logits_to_keep"] = 1  # the same prefill as the ONNX side's
            result["logits"] = "last position"
        with torch.inference_mode():
            model(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items() if k in accepted}, **extra)
        if device == "cuda":
            torch.cuda.synchronize()
            result["gpu_allocator_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if kind.endswith("cuda"):
        result["gpu_device_mb"] = _gpu_process_mb()
    result.update({"peak_rss_mb": round(peak_rss_mb(), 1), "batch": batch, "seq_len": seq_len})
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m slimline.evaluate.memory")
    p.add_argument("kind", choices=["onnx", "onnx-cuda", "torch", "torch-cuda"])
    p.add_argument("path")
    p.add_argument("--task", default="feature-extraction")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(_probe(a.kind, a.path, a.task, a.batch, a.seq_len, a.threads)))


if __name__ == "__main__":
    main()
