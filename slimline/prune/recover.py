"""``prune.recover``: a short distillation from the original model, on CPU, after pruning.

The pruned model (student) learns to reproduce the original's (teacher's) outputs on the recipe's
calibration text. For an encoder (``loss: embedding``): token_weight * MSE over real tokens (relative
to the teacher's scale) + pooled_weight * (1 - cosine) of the pooled embeddings. For a language model
(``loss: kl``, the default for text-generation): the KL divergence of the student's next-token
distribution from the teacher's, averaged over real tokens.
No labels are needed, and the report says how much it helped on held-back calibration texts.

With ``fake_quant: int8`` the student trains through simulated ONNX Runtime dynamic int8
(slimline.measure.quantsim): the distillation then also teaches it to absorb the rounding that a
later ``quantize.dynamic_int8`` will apply (quantization-aware distillation). The report adds the
held-out cosine measured through that simulation, before and after.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Literal

from pydantic import Field

from slimline.artifact import TorchModel
from slimline.errors import StageError
from slimline.family import family_of
from slimline.measure.inputs import calibration_batches
from slimline.measure.quantsim import fake_quant_int8, resolve_reduce_range
from slimline.models.modules import forward
from slimline.prune.common import clone, next_token_fidelity, output_error, token_kl
from slimline.stage import Context, Stage, StageResult


class Recover(Stage):
    """Distil the original model into the pruned one for a few hundred steps."""

    kind = "prune.recover"
    consumes = (TorchModel,)

    steps: int = Field(300, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(5e-5, gt=0)
    max_length: int = Field(64, ge=8, le=131072)
    held_out: int = Field(64, ge=1, le=100_000, description="calibration texts kept out of training to measure the effect")
    pooled_weight: float = Field(10.0, ge=0, description="weight of (1 - cosine) of pooled embeddings in the loss")
    token_weight: float = Field(1.0, ge=0, description="weight of the token-state MSE (normalized by the teacher's scale)")
    loss: Literal["auto", "embedding", "kl"] = Field(
        "auto", description="embedding: token MSE + pooled cosine; kl: next-token KL; auto: kl for text-generation"
    )
    fake_quant: Literal["none", "int8"] = Field(
        "none",
        description="int8: train through simulated ORT dynamic int8 (uint8 activations, int8 weights), "
        "for a model that quantize.dynamic_int8 will quantize next",
    )
    fake_quant_per_channel: bool = Field(
        True, description="simulate per-channel weight scales (match quantize.dynamic_int8's per_channel)"
    )
    fake_quant_reduce_range: bool | Literal["auto"] = Field(
        "auto", description="simulate 7-bit weights (match quantize.dynamic_int8's reduce_range; auto: no VNNI here)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)

    def run(self, artifact: TorchModel, ctx: Context) -> StageResult:
        import torch

        if ctx.reference is None:
            raise StageError("prune.recover needs the original model as teacher, and this run has none.")
        texts = ctx.data.calibration
        if len(texts) <= self.held_out + self.batch_size:
            raise StageError(
                f"prune.recover: {len(texts)} calibration texts are too few for batch_size={self.batch_size} plus "
                f"held_out={self.held_out}. Raise evaluate.data.calibration_size (e.g. 4000)."
            )
        teacher = ctx.reference.model
        out = clone(artifact)
        student = out.model
        held = calibration_batches(out.tokenizer, texts[: self.held_out], max_length=self.max_length)
        train_texts = texts[self.held_out :]
        kl = (self.loss if self.loss != "auto" else family_of(artifact.info.task).default_loss) == "kl"
        before = output_error(teacher, student, held)
        if kl:
            before.update(next_token_fidelity(teacher, student, held))
        fq = self.fake_quant == "int8"
        reduced = resolve_reduce_range(self.fake_quant_reduce_range)
        simulated = (lambda: fake_quant_int8(student, self.fake_quant_per_channel, reduced)) if fq else nullcontext
        if fq:
            with simulated():
                before_q = output_error(teacher, student, held)

        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        optim = torch.optim.AdamW(student.parameters(), lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / self.steps))
        student.eval()  # no dropout: the student should match the teacher exactly, not a noisy version of it
        start, losses = time.perf_counter(), []
        with ctx.reporter.task("prune.recover (distillation)", total=self.steps) as step:
            for _ in range(self.steps):
                idx = torch.randint(len(train_texts), (self.batch_size,), generator=gen).tolist()
                (batch,) = calibration_batches(
                    out.tokenizer, [train_texts[i] for i in idx], batch=self.batch_size, max_length=self.max_length
                )
                mask = batch["attention_mask"][..., None].float()  # (B, T, 1)
                with torch.no_grad():
                    target = forward(teacher, batch)[0]
                with simulated():
                    pred = forward(student, batch)[0]
                if kl:
                    loss = (token_kl(target, pred) * mask[..., 0]).sum() / mask.sum()
                else:
                    scale = ((target**2) * mask).sum() / (mask.sum() * pred.shape[-1])  # teacher's mean square
                    mse = (((pred - target) ** 2) * mask).sum() / (mask.sum() * pred.shape[-1]) / scale
                    pooled_p, pooled_t = (pred * mask).sum(1) / mask.sum(1), (target * mask).sum(1) / mask.sum(1)
                    cos = torch.nn.functional.cosine_similarity(pooled_p, pooled_t, dim=-1).mean()
                    loss = self.token_weight * mse + self.pooled_weight * (1 - cos)
                optim.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optim.step()
                sched.step()
                losses.append(float(loss.detach()))
                step.advance()
        student.eval()
        after = output_error(teacher, student, held)
        if kl:
            after.update(next_token_fidelity(teacher, student, held))
        if fq:
            with simulated() as wrapped:
                after_q = output_error(teacher, student, held)
        report = {
            "loss": "kl" if kl else "embedding",
            "steps": self.steps,
            "train_s": round(time.perf_counter() - start, 1),
            "loss.first": round(sum(losses[:10]) / min(10, len(losses)), 5),
            "loss.last": round(sum(losses[-10:]) / min(10, len(losses)), 5),
            "held_out.mean_cosine.before": before["calibration.mean_cosine"],
            "held_out.mean_cosine.after": after["calibration.mean_cosine"],
        }
        if fq:
            report.update(
                {
                    "fake_quant": f"int8 ({'per-channel' if self.fake_quant_per_channel else 'per-tensor'} "
                    f"{'7-bit' if reduced else '8-bit'} weights, "
                    f"{wrapped['linear']} Linear + {wrapped['embedding']} Embedding)",
                    "held_out.mean_cosine.int8_simulated.before": before_q["calibration.mean_cosine"],
                    "held_out.mean_cosine.int8_simulated.after": after_q["calibration.mean_cosine"],
                }
            )
        if kl:
            for k in ("top1_agreement", "token_kl"):
                report.update({f"held_out.{k}.before": before[k], f"held_out.{k}.after": after[k]})
        if kl and after["token_kl"] > before["token_kl"]:
            ctx.warn(
                f"prune.recover: distillation raised the held-out next-token KL ({before['token_kl']} -> "
                f"{after['token_kl']}); try a lower lr or fewer steps."
            )
        elif not kl:
            # With fake_quant the goal is the quantized model's fidelity: its float cosine may give a little.
            b, a = (before_q, after_q) if fq else (before, after)
            if a["calibration.mean_cosine"] < b["calibration.mean_cosine"]:
                ctx.warn(
                    f"prune.recover: distillation lowered held-out cosine{' (int8 simulated)' if fq else ''} "
                    f"({b['calibration.mean_cosine']} -> {a['calibration.mean_cosine']}); try a lower lr or fewer steps."
                )
        return StageResult(out, report)
