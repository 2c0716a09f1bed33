"""The model-family adapter: the one place that knows what differs between kinds of model.

Stages, evaluators and checks ask the model's family instead of testing the task string:

| question | encoder (feature-extraction, text-classification, token-classification) | decoder (text-generation) |
|---|---|---|
| transformers class | AutoModel / AutoModelForSequenceClassification | AutoModelForCausalLM |
| what fidelity compares | pooled sentence embeddings, or class logits | every real token's next-token logits |
| calibration inputs | padded batches of texts | the texts as one token stream, cut into full windows, with an empty KV cache |
| export | optimum's exporter | dynamo, with its KV cache |
| fusion | BERT attention, EmbedLayerNorm, SkipLayerNorm, BiasGelu | RMSNorm (or LayerNorm), rotary, GroupQueryAttention with scale, soft-cap and window (GPT-2: MultiHeadAttention), merged sibling MatMuls |
| distillation loss | token states + pooled cosine | next-token KL |
| evaluation | fidelity, neighbours, encoder speed | perplexity, top-1 agreement, prefill and decode speed |
| lengths a run asks for | `evaluate.data.max_length`, `evaluate.speed.seq_len` | `evaluate.generation.*` |

New families are new entries here (`decoder_contract`, `KNOWN_DECODERS`), not new forks in the stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimline.measure import metrics
from slimline.measure.inputs import calibration_feeds


@dataclass(frozen=True)
class Family:
    """What one kind of model needs. ``task`` is the recipe's ``model.task``."""

    name: str  # "encoder" | "decoder"
    task: str

    @property
    def is_decoder(self) -> bool:
        return self.name == "decoder"

    @property
    def vectors(self) -> str:
        """What fidelity compares: ``embeddings``, ``logits`` (one row per text) or ``token-logits``
        (one row per real token: token classification)."""
        return {"feature-extraction": "embeddings", "token-classification": "token-logits"}.get(self.task, "logits")

    @property
    def default_loss(self) -> str:
        """``prune.recover``'s ``loss: auto``."""
        return "kl" if self.is_decoder else "embedding"

    def auto_class(self) -> Any:
        """The transformers class that loads this kind of model (imports transformers)."""
        import transformers

        if self.is_decoder:
            return transformers.AutoModelForCausalLM
        if self.task == "feature-extraction":
            return transformers.AutoModel
        if self.task == "token-classification":
            return transformers.AutoModelForTokenClassification
        return transformers.AutoModelForSequenceClassification

    def task_vectors(self, output: np.ndarray, mask: np.ndarray, pooling: str = "mean") -> np.ndarray:
        """What fidelity is measured on: pooled embeddings (feature-extraction), each real token's logits
        (token-classification: ``[tokens, labels]``, padding dropped) or the logits (the others)."""
        if self.task == "feature-extraction":
            return metrics.pool(output, mask, pooling)
        if self.vectors == "token-logits":
            return output[mask.astype(bool)].astype(np.float32)
        return output.astype(np.float32)

    def evaluation_lengths(self, evaluate: Any, timed: bool) -> list[tuple[str, int]]:
        """The sequence lengths a run's evaluation asks of the model, by recipe path."""
        if self.is_decoder:
            g = evaluate.generation
            wanted = [("evaluate.generation.context", g.context)]
            if timed:
                wanted += [("evaluate.generation.prompt_lengths", max(g.prompt_lengths))]
                wanted += [("evaluate.generation.decode_prompt + new_tokens", g.decode_prompt + g.new_tokens)]
            return wanted
        wanted = [("evaluate.data.max_length", evaluate.data.max_length)]
        if timed:
            wanted += [("evaluate.speed.seq_len", evaluate.speed.seq_len)]
        return wanted

    def output_fidelity(
        self,
        ref_path: Path,
        new_path: Path,
        tokenizer: Any,
        texts: list[str],
        pooling: str,
        threads: int = 0,
        config: Any = None,
    ) -> dict[str, float]:
        """Mean/min cosine of the new graph's task vectors against the reference graph's on ``texts``.

        For a decoder the vectors are each real token's next-token logits, and the share of tokens
        whose top-1 prediction is unchanged is reported too."""
        from slimline.runtime import ort_function

        run_ref, inputs = ort_function(ref_path, threads)
        run_new, _ = ort_function(new_path, threads)
        cos, agree = [], []
        for feeds in calibration_feeds(tokenizer, texts, inputs, config=config):
            a = next(iter(run_ref(feeds).values()))
            b = next(iter(run_new(feeds).values()))
            mask = feeds["attention_mask"]
            if self.is_decoder:
                keep = mask.astype(bool)
                a, b = a[keep], b[keep]
                cos.append(metrics.cosine(a, b))
                agree.append(a.argmax(-1) == b.argmax(-1))
            else:
                cos.append(metrics.cosine(self.task_vectors(a, mask, pooling), self.task_vectors(b, mask, pooling)))
        out = metrics.cosine_summary(np.concatenate(cos) if cos else np.ones(1))
        if agree:
            out["calibration.top1_agreement"] = round(float(np.concatenate(agree).mean()), 5)
        return out


# Encoders whose position ids start at padding_idx + 1: EmbedLayerNormalization can't express the offset,
# so their embedding sum becomes one more SkipLayerNormalization instead (docs/compile.md).
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet")
# The encoder and decoder types whose fused graphs the tests check op by op (tests/test_family.py).
# Encoders with relative-position (disentangled) attention: ONNX Runtime has no fused kernel for it, so
# their attention stays MatMul/Softmax and the contract covers the norms and the GELU only.
RELATIVE_ATTENTION = ("deberta-v2",)
KNOWN_ENCODERS = ("bert", "distilbert", "electra", *OFFSET_POSITIONS, *RELATIVE_ATTENTION)
RMS_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
KNOWN_DECODERS = (*RMS_DECODERS, "gpt2")
QK_NORMS = ("qwen3", "gemma3_text")  # a norm on each head's query and key, before rotary
SANDWICH_NORMS = ("gemma2", "gemma3_text")  # a norm after attention and after the MLP too


def decoder_contract(model_type: str, layers: int) -> tuple[dict[str, int], str]:
    """The fused ops per decoder type, worked out from its layer structure (checked op by op on a tiny
    model of each type in tests/test_family.py)."""
    if model_type == "gpt2":
        # learned positions and LayerNorm: the embedding sum and each residual Add fuse into the
        # following LayerNorm; attention without rotary is MultiHeadAttention with past and present
        contract = {"MultiHeadAttention": layers, "SkipLayerNormalization": 2 * layers + 1, "FastGelu": layers}
        how = f"{model_type}, {layers} layers: one MultiHeadAttention, two skip LayerNorms and a FastGelu per layer, one more skip LayerNorm for the embeddings"
        return contract, how
    # every layer's two residual Adds fuse into the norm after them; the first layer's input norm has no
    # residual yet and the final norm takes the last layer's residual
    contract = {"GroupQueryAttention": layers, "SkipSimplifiedLayerNormalization": 2 * layers, "SimplifiedLayerNormalization": 1}
    how = f"{model_type}, {layers} layers: one GroupQueryAttention and two skip RMSNorms per layer, one RMSNorm"
    if model_type in SANDWICH_NORMS:  # the post-attention and post-MLP norms take no residual
        contract["SimplifiedLayerNormalization"] += 2 * layers
        contract["FastGelu"] = layers  # Gemma's MLP: GeGLU with the tanh GELU
        how += ", two more RMSNorms per layer (after attention and after the MLP), a FastGelu per layer"
    if model_type in QK_NORMS:  # GroupQueryAttention's rule keeps them as RMSNorms in front of it
        contract["SimplifiedLayerNormalization"] += 2 * layers
        how += ", two more per layer on queries and keys"
    return contract, how


def layer_count(config: Any) -> int:
    for name in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def expected_fusions(family: Family, config: Any) -> tuple[dict[str, int], str]:
    """The fusion contract (minimum count per fused op) slimline's rules reach on this model, computed
    from its config, and how it was worked out. Empty for a model type the tests don't cover."""
    model_type = getattr(config, "model_type", "")
    layers = layer_count(config)
    if family.is_decoder:
        if model_type not in KNOWN_DECODERS or not layers:
            return {}, f"no contract known for decoder type `{model_type}`"
        return decoder_contract(model_type, layers)
    if model_type not in KNOWN_ENCODERS or not layers:
        return {}, f"no contract known for encoder type `{model_type}`"
    act = getattr(config, "hidden_act", None) or getattr(config, "activation", None)
    relative = model_type in RELATIVE_ATTENTION
    contract = {"SkipLayerNormalization": 2 * layers} if relative else {"Attention": layers, "SkipLayerNormalization": 2 * layers}
    if act == "gelu":  # the erf GELU: BiasGelu; tanh approximations fuse otherwise
        contract["BiasGelu"] = layers
    if model_type in OFFSET_POSITIONS:  # the embedding sum fuses into one more skip LayerNorm instead
        contract["SkipLayerNormalization"] += 1
    elif not relative:
        contract["EmbedLayerNormalization"] = 1
    how = f"{model_type}, {layers} layers: " + (
        "two skip LayerNorms per layer (relative-position attention has no fused ONNX Runtime kernel and runs unfused)"
        if relative
        else "one Attention and two skip LayerNorms per layer"
    )
    how += ", one BiasGelu per layer" if "BiasGelu" in contract else ""
    if not relative:
        how += (
            ", one EmbedLayerNormalization"
            if "EmbedLayerNormalization" in contract
            else " (offset positions: the embedding sum is one more skip LayerNorm, no EmbedLayerNormalization)"
        )
    return contract, how


# Layers by role, for a recipe's `exclude: ["role:ffn.out@0"]`: the module path of each MatMul (from
# the node's name or the exporter's scope metadata) ends with one of these, across the families.
MATMUL_ROLES: dict[str, str] = {
    "attention.qkv": r"(attention\.self\.(query|key|value)|attention\.(q_lin|k_lin|v_lin)|self_attn\.(q|k|v|qkv)_proj|attn\.c_attn)",
    "attention.out": r"(attention\.output\.dense|attention\.out_lin|self_attn\.o_proj|attn\.c_proj)",
    "ffn.in": r"(intermediate\.dense|ffn\.lin1|mlp\.(gate_proj|up_proj|gate_up_proj)|mlp\.c_fc)",
    "ffn.out": r"((?<!attention\.)output\.dense|ffn\.lin2|mlp\.down_proj|mlp\.c_proj)",
}
ROLE_SYNTAX = "role:NAME or role:NAME@LAYER (LAYER counts from 0; -1 is the last), NAME one of " + ", ".join(MATMUL_ROLES)


LAYER_INDEX = re.compile(r"(?:layers?|h|blocks?)\.(\d+)\.")  # the layer number in a module path


def role_of(path: str) -> str:
    """The role a module path plays, with its layer (``ffn.out@0`` for ``encoder.layer.0.output.dense``):
    the selector ``layers_by_role`` reads back; '' when no role matches."""
    for role, pattern in MATMUL_ROLES.items():
        if re.search(pattern + r"$", path):
            m = LAYER_INDEX.search(path + ".")
            return f"{role}@{m.group(1)}" if m else role
    return ""


def layers_by_role(paths: dict[str, str], selector: str) -> tuple[list[str], str | None]:
    """The node names whose module path (``paths``: node name -> dotted path) plays the role ``selector``
    names (``role:ffn.out@0``), and an error when the selector can't be read."""
    body = selector.removeprefix("role:")
    role, _, layer = body.partition("@")
    if role not in MATMUL_ROLES or (layer and not re.fullmatch(r"-?\d+", layer)):
        return [], f"`{selector}` is not a layer role: write {ROLE_SYNTAX}"
    suffix = re.compile(MATMUL_ROLES[role] + r"$")
    found = [(name, LAYER_INDEX.search(path + ".")) for name, path in paths.items() if suffix.search(path)]
    if layer:
        numbers = sorted({int(m.group(1)) for _, m in found if m})
        if not numbers:
            return [], None
        want = numbers[int(layer)] if -len(numbers) <= int(layer) < len(numbers) else None
        found = [(n, m) for n, m in found if m and int(m.group(1)) == want]
    return [name for name, _ in found], None


def family_of(task: str) -> Family:
    """The family of a model by its recipe task."""
    return Family("decoder" if task == "text-generation" else "encoder", task)
