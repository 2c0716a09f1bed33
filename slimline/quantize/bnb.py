"""``quantize.bitsandbytes``: LLM.int8 and nf4/fp4 weights for users who deploy on PyTorch.

Quantization is transformers' own bitsandbytes integration (``BitsAndBytesConfig`` at load time), so
the result is the model a user would get with ``from_pretrained(..., quantization_config=...)`` and
saves/loads the standard way. bitsandbytes 0.50 runs both schemes on the CPU (slowly: its kernels
target CUDA); the ``torch-cuda`` target is where they pay.

What we add: each Linear's output error on calibration inputs against the float layer, the output
cosine of the whole model, the parameter memory before/after, and a reload check of the saved
checkpoint. On the CPU, bitsandbytes 0.50's 4-bit ``save_pretrained`` rewrites the live weights of
the instance it saves (measured: mean cosine 0.28 afterwards), so the stage saves a second instance
and the run copies that folder; the evaluated instance is never saved.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.measure.inputs import calibration_batches, check_texts
from slimline.measure.metrics import relative_error
from slimline.quantize import calib
from slimline.stage import Context, Stage, StageResult


class BitsAndBytes(Stage):
    """bitsandbytes int8 (LLM.int8 with outlier columns in fp16) or 4-bit nf4/fp4 Linear layers."""

    kind = "quantize.bitsandbytes"
    consumes = (TorchModel,)

    scheme: Literal["int8", "nf4", "fp4"] = Field("int8", description="int8: LLM.int8; nf4/fp4: 4-bit blockwise")
    threshold: float = Field(6.0, ge=0, description="int8: activation magnitude above which a column runs in fp16")
    double_quant: bool = Field(False, description="4-bit: quantize the block scales too")
    exclude: list[str] = Field(
        ["*pooler*", "*classifier*", "lm_head"],
        description="glob patterns of Linear module names kept in float (the same globs as every stage's exclude)",
    )
    min_cosine: float = Field(0.9, ge=0, le=1, description="fail if calibration outputs fall below this cosine")

    def config(self, skip: list[str]) -> Any:
        """transformers' config; ``skip`` is the exact module names ``exclude`` matched (transformers
        itself matches skip names as substrings, which a glob must not be fed to)."""
        import torch
        from transformers import BitsAndBytesConfig

        if self.scheme == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.threshold, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.scheme,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=self.double_quant,
            llm_int8_skip_modules=skip,
        )

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        import importlib.util

        import torch

        if importlib.util.find_spec("bitsandbytes") is None:
            raise StageError(f"{self.kind}: the bitsandbytes package is not installed. `pip install bitsandbytes==0.50.0`.")
        from slimline.models.modules import forward, hooks

        texts = check_texts(ctx.data.calibration[:64], self.kind)
        float_dir = ctx.stage_dir("bitsandbytes") / "float"
        artifact.model.save_pretrained(float_dir)
        cls = type(artifact.model)
        linears = [n for n, m in artifact.model.named_modules() if isinstance(m, torch.nn.Linear)]
        skip = sorted({n for n in linears for p in self.exclude if fnmatch.fnmatchcase(n, p)})

        def load(device: str = "cpu") -> Any:
            with _quiet_bnb():
                return cls.from_pretrained(
                    float_dir, quantization_config=self.config(skip), device_map=device, dtype=torch.float32
                ).eval()

        model = load()
        quantized = {n: m for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
        if not quantized:
            raise StageError(
                f"{self.kind}: no Linear layer was quantized (exclude={self.exclude}); a float model is not a quantized one."
            )
        reference = dict(artifact.model.named_modules())
        batches = calibration_batches(artifact.tokenizer, texts)
        errors: dict[str, float] = {}

        def layer_error(name: str, _module: Any, inputs: Any, output: Any) -> None:
            ref = reference[name](inputs[0].to(torch.float32))
            errors[name] = max(errors.get(name, 0.0), relative_error(ref.numpy(), output.float().numpy()))

        small = [n for n, m in quantized.items() if getattr(m, "in_features", 64) < 64]
        try:
            with torch.no_grad(), hooks(quantized, layer_error):
                outs = [forward(model, b)[0] for b in batches[:4]]
        except RuntimeError as e:
            hint = (
                f" Layers with fewer than 64 inputs ({', '.join(small[:3])}) are a known cause: add them to `exclude`."
                if small
                else ""
            )
            raise StageError(f"{self.kind}: bitsandbytes ({self.scheme}) failed running the quantized model: {e}.{hint}") from e
        with torch.no_grad():
            refs = [forward(artifact.model, b)[0] for b in batches[:4]]
        from slimline.family import family_of
        from slimline.measure.metrics import cosine, cosine_summary

        family = family_of(artifact.info.task)
        cos = [
            cosine(
                family.task_vectors(r.numpy(), b["attention_mask"].numpy(), artifact.info.pooling),
                family.task_vectors(o.float().numpy(), b["attention_mask"].numpy(), artifact.info.pooling),
            )
            for r, o, b in zip(refs, outs, batches, strict=False)
        ]
        import numpy as np

        report: dict[str, Any] = {"scheme": self.scheme, "quantized_linears": len(quantized)}
        report["param_mb.before"] = round(sum(p.numel() * p.element_size() for p in artifact.model.parameters()) / 1e6, 2)
        report["param_mb.after"] = round(model.get_memory_footprint() / 1e6, 2)
        calib.layer_report(errors, report)
        report.update(cosine_summary(np.concatenate(cos)))
        saved = ctx.stage_dir("bitsandbytes") / "saved"
        report.update(self._reload_check(load(), saved, batches[0], outs[0], ctx))
        if report["calibration.mean_cosine"] < self.min_cosine:
            worst = sorted(errors, key=lambda n: -errors[n])[:3]
            raise StageError(
                f"{self.kind}: outputs on calibration text fell to mean cosine {report['calibration.mean_cosine']:.3f} "
                f"(< min_cosine={self.min_cosine}). Highest-error layers: {', '.join(worst)}. Add them to `exclude`."
            )
        unmatched = [p for p in self.exclude if not any(fnmatch.fnmatchcase(n, p) for n in reference)]
        for p in unmatched:
            ctx.warn(f"{self.kind}: exclude `{p}` matches no module.")
        # a bitsandbytes model refuses .to(): the torch-cuda target quantizes the float weights again on
        # the GPU, as a user deploying there would (from_pretrained with device_map="cuda")
        return StageResult(TorchModel(model, artifact.tokenizer, artifact.info, saved=saved, load_on=load), report)

    def _reload_check(self, copy: Any, folder: Path, batch: dict, out: Any, ctx: Context) -> dict[str, Any]:
        """Save a second quantized instance and reload it; a mismatch is reported, not hidden.

        The returned model is never saved (see the module docstring).
        """
        import torch

        from slimline.models.modules import forward

        copy.save_pretrained(folder)
        with _quiet_bnb():
            again = type(copy).from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
        with torch.no_grad():
            diff = float((forward(again, batch)[0].float() - out.float()).abs().max())
        del copy, again
        if diff > 1e-3:
            ctx.warn(
                f"{self.kind}: the saved {self.scheme} checkpoint reloads with different outputs (max abs diff {diff:.3g}). "
                "The in-memory model evaluated here is correct; to deploy, load the float model with "
                "from_pretrained(..., quantization_config=BitsAndBytesConfig(...)) instead of the saved folder."
            )
        return {"reload_max_abs_diff": round(diff, 6)}


class _quiet_bnb:
    """bitsandbytes logs a missing optional `kernels` package on every CPU 4-bit load."""

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger("bitsandbytes")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)
