"""transformers' own forward pass over a checkpoint too big to load: one module's weights at a time.

The model is built with its parameters on the meta device (no storage; buffers such as the rotary
frequencies are real). Every module that owns parameters gets a pre-forward hook that reads them from
the ``Checkpoint`` (float32) and a post-forward hook that puts them back on the meta device, so the
resident weights are one module's (an 8B Llama's largest is its LM head, 2.1 GB in fp32) while the
forward code is transformers' own. This is the reference the streaming build's parity is measured
against ("torch on the same weights"), and the way the sequential calibration will walk the layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimline.models.lazy import Checkpoint, checkpoint_name


class SequentialModel:
    """``logits(ids)`` of a causal LM whose weights are read module by module from ``folder``."""

    def __init__(self, folder: Path | str, ckpt: Checkpoint | None = None, transform: Any = None) -> None:
        """``transform(name, array)``, if given, changes each checkpoint tensor as it is read (e.g. the
        streaming build's quantization round trip, to check the artifact against the same rounding)."""
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from slimline.models.loader import attention_kwargs

        self.folder = Path(folder)
        self.transform = transform
        self.ckpt = ckpt or Checkpoint(folder)
        self.config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32, **attention_kwargs(folder)).eval()
        tied = {}
        if getattr(self.config, "tie_word_embeddings", False):
            embed = next(
                n for n, _ in self.model.named_parameters() if n.endswith("embed_tokens.weight") or n.endswith("wte.weight")
            )
            tied = {n: embed for n, _ in self.model.named_parameters() if n.endswith("lm_head.weight")}
        self._names: dict[int, dict[str, str]] = {}
        self._prefix: dict[int, str] = {}
        for prefix, module in self.model.named_modules():
            self._prefix[id(module)] = f"{prefix}." if prefix else ""
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            names = {}
            for local in own:
                fqn = f"{prefix}.{local}" if prefix else local
                found = checkpoint_name(fqn, self.ckpt, tied)
                if found is None:
                    from slimline.errors import ModelError

                    raise ModelError(f"{self.folder}: the checkpoint has no tensor `{fqn}`.")
                names[local] = found
            self._names[id(module)] = names
            module.register_forward_pre_hook(self._onload)
            module.register_forward_hook(self._offload)

    def names_of(self, module: Any) -> dict[str, str]:
        """The checkpoint tensor behind each of ``module``'s own parameters."""
        return self._names[id(module)]

    def _onload(self, module: Any, args: Any) -> None:
        import torch
        from accelerate.utils import set_module_tensor_to_device

        for local, name in self._names[id(module)].items():
            value = self.ckpt.read(name)
            if self.transform is not None:
                value = self.transform(f"{self._prefix[id(module)]}{local}", value)
            set_module_tensor_to_device(module, local, "cpu", value=torch.from_numpy(value))

    def _offload(self, module: Any, args: Any, output: Any) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for local in self._names[id(module)]:
            set_module_tensor_to_device(module, local, "meta")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``[batch, seq, vocab]`` logits of ``ids`` (no cache: the whole sequence)."""
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.asarray(ids, np.int64)), use_cache=False).logits.float().numpy()
