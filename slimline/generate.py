"""A small generation loop over ONNX Runtime with the graph's own KV cache.

``OnnxDecoder`` holds one session and the cache between calls: ``prefill`` runs the prompt, ``step``
feeds one token per sequence. Greedy or sampled (temperature, top-k, top-p), streaming each token to
a callback, stopping at EOS or the context limit. A batch's prompts may differ in length (right-padded,
with ``lengths``) on the fused graph, whose GroupQueryAttention reads each row's length off
``attention_mask``; a prompt longer than the context is refused before any compute.

Two things keep a decode step cheap:
- the prefill asks for the last position's logits only (``logits_to_keep``, when the graph has it);
- with GroupQueryAttention, the KV cache lives in preallocated buffers bound (ONNX Runtime IO
  binding) as both the past input and the present output, so the kernel appends each step's keys
  and values in place instead of returning a fresh copy of the whole cache (SmolLM2: +5% tokens/s).
  The buffers hold the prompt plus ``max_new_tokens`` and double if a caller steps past them.

On the CUDA EP (``providers=["CUDAExecutionProvider", ...]``) those buffers live on the GPU: each step
sends the new token ids and positions up and brings the last position's logits back, and the cache
never crosses the bus. The cache's dtype follows the graph (fp16 for a ``quantize.fp16`` decoder).

``cuda_graph=True`` (CUDA EP, GroupQueryAttention graphs) replays each decode step as one CUDA graph
(ONNX Runtime's ``enable_cuda_graph``) instead of launching every kernel from the host, which is what
bounds a small model's decode on a large GPU. A graph replays fixed shapes at fixed addresses, so a
step's every input lives in a GPU buffer bound once: the token ids, the positions, and an attention
mask as wide as the whole cache (ones up to each row's length, zeros after; GroupQueryAttention reads
the lengths off it, and the total length it sees is the buffer's). The prompt runs outside the graph.
The same fixed-shape step runs on the CPU (``static_step``), which is how the tests check that it gives
the same tokens as the growing-mask step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimline.errors import SlimlineError
from slimline.measure.inputs import LOGITS_TO_KEEP


class GenerationError(SlimlineError):
    """A prompt or cache the model can't take (user input: no traceback)."""


@dataclass
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    eos_ids: set[int] = field(default_factory=set)
    # exact greedy speculative decoding: up to this many draft tokens per step, copied from where the
    # last n-gram (3, 2 or 1 tokens) last occurred in the prompt or the output, verified in one run
    prompt_lookup: int = 0


class OnnxDecoder:
    """A decoder ONNX graph (``input_ids, attention_mask, position_ids, past_key_values.*``) with its cache."""

    def __init__(
        self,
        path: Path,
        threads: int = 0,
        providers: list[str] | None = None,
        max_context: int | None = None,
        cuda_graph: bool = False,
    ):
        from slimline.runtime import float_dtype, ort_session

        if cuda_graph:
            providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]  # type: ignore[list-item]
        self.session = ort_session(Path(path), threads, providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        # graphs from compile.export can skip the LM head for all but the last prompt position
        self.can_keep_last = keeps_last_logits(self.session)
        if not self.past_names or "logits" not in self.outputs:
            raise GenerationError(
                f"{path}: not a decoder graph with a KV cache (inputs past_key_values.*, output logits). "
                "Export it with compile.export and model.task: text-generation."
            )
        self.kv_heads, self.head_dim = kv_dims(self.inputs[self.past_names[0]].shape, Path(path).parent)
        self.cache_dtype = float_dtype(self.inputs[self.past_names[0]])
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # where the in-place cache lives: numpy arrays shared with ORT on the CPU, else OrtValues
        # allocated on (device, id); tests run the OrtValue path on the CPU by setting ("cpu", 0)
        self.buffer_device: tuple[str, int] | None = ("cuda", 0) if self.device == "cuda" else None
        self.max_context = max_context
        self.past: dict[str, np.ndarray] = {}
        self.length = 0
        # GroupQueryAttention reads each row's length from attention_mask, not from the cache's shape, so
        # the cache can live in fixed buffers that the kernel appends to in place (bound as both the
        # past input and the present output); other attention ops concatenate and need exact shapes.
        self.in_place = in_place_cache(Path(path), self.past_names)
        # int4 CPU kernels that quantize activations to int8 (MatMulNBits at accuracy_level 4, MatMulQ4)
        # make a graph's logits depend on how many tokens run together (_int8_activation_matmuls)
        self.exact_multi_token = not _int8_activation_matmuls(Path(path))
        self._binding: Any = None
        self._buffers: dict[str, Any] = {}  # numpy arrays on the CPU, OrtValues on the GPU
        self._capacity = 0
        self.reserve = 0  # decode steps to allocate for at prefill (generate() sets it)
        self.rows: np.ndarray | None = None  # each row's length when a batch's prompts differ in length
        self._step_bound = False
        # On the GPU the prompt runs against the bound buffers too: the CUDA GroupQueryAttention refuses
        # an empty past tensor ("total sequence length must be positive"), and the prompt's keys and
        # values land in the buffers directly.
        self.prefill_in_place = self.in_place and self.device == "cuda"
        self.cuda_graph = cuda_graph
        if cuda_graph and not (self.in_place and self.device == "cuda" and "attention_mask" in self.inputs):
            raise GenerationError(
                f"{path}: cuda_graph needs the CUDA EP and a fused graph (GroupQueryAttention with attention_mask), "
                f"got providers {self.session.get_providers()} and {'a' if self.in_place else 'no'} GroupQueryAttention cache."
            )
        # decode steps of fixed shapes (mask as wide as the cache): what a CUDA graph replays; tests set it on the CPU
        self.static_step = cuda_graph
        self._graph_runs = (None, None)  # RunOptions: prompts outside any graph, steps in the current graph id
        if cuda_graph:
            import onnxruntime as ort

            outside = ort.RunOptions()
            outside.add_run_config_entry("gpu_graph_id", "-1")
            self._graph_runs = (outside, None)
        self._graph_id = 0

    def _check_context(self, total: int) -> None:
        if self.max_context and total > self.max_context:
            raise GenerationError(f"the sequence would reach {total} tokens, over the model's context of {self.max_context}.")

    def _run(self, ids: np.ndarray, last_only: bool = False, lengths: np.ndarray | None = None) -> np.ndarray:
        batch, new = ids.shape
        total = self.length + new
        self._check_context(total)
        feeds = {
            "input_ids": ids.astype(np.int64),
            "attention_mask": _mask(lengths, total) if lengths is not None else np.ones((batch, total), np.int64),
            "position_ids": np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, new)).copy(),
            **self.past,
        }
        feeds = {k: v for k, v in feeds.items() if k in self.inputs}
        if last_only and self.can_keep_last and new > 1:
            feeds[LOGITS_TO_KEEP] = np.array([1], np.int64)
        try:
            values = self.session.run(self.outputs, feeds)
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            shapes = {k: v.shape for k, v in feeds.items() if k.startswith("past_key_values.0.")}
            raise GenerationError(
                f"the decoder rejected its inputs ({str(e).splitlines()[0][:200]}); input_ids {ids.shape}, KV cache {shapes}. "
                "The cache must hold [batch, kv_heads, past, head_dim] for the same batch as input_ids."
            ) from None
        out = dict(zip(self.outputs, values, strict=True))
        self.past = {name: out[name.replace("past_key_values", "present")] for name in self.past_names}
        got = self.past[self.past_names[0]].shape
        if got[0] != batch or got[2] != total:
            raise GenerationError(f"the graph returned a KV cache of shape {got}, expected batch {batch} and length {total}.")
        self.length = total
        return out["logits"]

    def _bind_cache(self, capacity: int) -> None:
        """Move the cache into buffers of ``capacity`` positions, bound as past input and present output
        (numpy arrays shared with ORT on the CPU; OrtValues in device memory on the GPU)."""
        import onnxruntime as ort

        source = self.cache() if self._buffers else self.past
        binding = self.session.io_binding()
        binding.bind_output("logits")  # first, so that get_outputs()[0] is the logits
        buffers = {}
        for name in self.past_names:
            old = source[name]
            buf = np.zeros((old.shape[0], self.kv_heads, capacity, self.head_dim), self.cache_dtype)
            buf[:, :, : self.length] = old[:, :, : self.length]
            if self.buffer_device:
                value = ort.OrtValue.ortvalue_from_numpy(buf, *self.buffer_device)  # a copy in device memory
                buffers[name] = value
            else:
                value = ort.OrtValue.ortvalue_from_numpy(buf)  # shares buf's memory
                buffers[name] = buf
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
        batch = source[self.past_names[0]].shape[0]
        self._mask = np.ones((batch, capacity), np.int64)
        self._binding, self._buffers, self.past, self._capacity = binding, buffers, {}, capacity
        self._bind_step_inputs(batch)

    def _bind_step_inputs(self, batch: int) -> None:
        """A decode step's small inputs live in host arrays bound once and rewritten in place before each
        run (on the GPU, ORT copies these few bytes up with the run)."""
        import onnxruntime as ort

        self._ids, self._positions = np.zeros((batch, 1), np.int64), np.zeros((batch, 1), np.int64)
        if self.static_step:  # fixed addresses for every input and the logits, in the cache's memory
            where = self.buffer_device or ("cpu", 0)
            self._step_values = {
                "input_ids": ort.OrtValue.ortvalue_from_numpy(self._ids, *where),
                "position_ids": ort.OrtValue.ortvalue_from_numpy(self._positions, *where),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(self._mask, *where),
            }
            for name, value in self._step_values.items():
                if name in self.inputs:
                    self._binding.bind_ortvalue_input(name, value)
            logits = self.session.get_outputs()[0]
            vocab = logits.shape[-1]
            if not isinstance(vocab, int):
                raise GenerationError("a fixed-shape decode step needs the vocabulary size in the graph's logits shape.")
            dtype = np.float16 if logits.type == "tensor(float16)" else np.float32
            self._step_values["logits"] = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, 1, vocab), dtype), *where)
            self._binding.bind_ortvalue_output("logits", self._step_values["logits"])
            if self.cuda_graph:  # new addresses: a new graph (one captured for old buffers must never replay)
                self._graph_id += 1
                inside = ort.RunOptions()
                inside.add_run_config_entry("gpu_graph_id", str(self._graph_id))
                self._graph_runs = (self._graph_runs[0], inside)
        else:
            self._binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self._ids))
            if "position_ids" in self.inputs:  # graphs that derive positions from the mask have none
                self._binding.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(self._positions))
        self._step_bound = True

    def _static_step(self, ids: np.ndarray, positions: np.ndarray, total: int) -> np.ndarray:
        """A decode step whose inputs and output keep their shapes and addresses (a CUDA graph replay)."""
        self._ids[:] = ids
        self._positions[:] = positions
        if self.rows is not None:  # each row's own length
            self._mask[:] = _mask(self.rows + 1, self._capacity)
        else:
            self._mask[:, :total] = 1
            self._mask[:, total:] = 0
        values = self._step_values
        for name, host in (("input_ids", self._ids), ("position_ids", self._positions), ("attention_mask", self._mask)):
            if self.buffer_device:
                values[name].update_inplace(host)
        try:
            self.session.run_with_iobinding(self._binding, self._graph_runs[1])
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            raise GenerationError(f"the decoder rejected a fixed-shape decode step ({str(e).splitlines()[0][:200]}).") from None
        return values["logits"].numpy()

    def _run_bound(self, ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids [batch, new]`` against the bound buffers (a decode step, or a whole prompt when
        ``prefill_in_place``, whose rows may end early at ``lengths``); returns the logits of every new
        position. With rows of different lengths each row's token goes at its own length."""
        batch, new = ids.shape
        cached = self._ids.shape[0] if self._buffers else next(iter(self.past.values())).shape[0]
        if batch != cached:
            raise GenerationError(
                f"{batch} tokens for a KV cache of {cached} sequences: the cache must hold "
                "[batch, kv_heads, past, head_dim] for the same batch as input_ids."
            )
        ragged = self.rows is not None and new == 1
        total = int(self.rows.max()) + 1 if ragged else self.length + new
        self._check_context(total)
        if self._binding is None or total > self._capacity:
            self._bind_cache(max(2 * total, total + self.reserve, 16))
        b = self._binding
        if ragged:  # each row's next position is its own length
            positions = self.rows[:, None].astype(np.int64)
            mask = _mask(self.rows + 1, total)
        else:
            positions = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, new))
            mask = _mask(lengths, total) if lengths is not None else self._mask[:, :total]
        if new == 1 and self.static_step:
            if not self._step_bound:
                self._bind_step_inputs(batch)
            logits = self._static_step(ids, positions, total)
            self.length = total
            if ragged:
                self.rows = self.rows + 1
            return logits
        if new == 1:
            if not self._step_bound:  # after a prompt: the step's own arrays, bound once more
                self._bind_step_inputs(batch)
            self._ids[:] = ids
            self._positions[:] = positions
        else:  # a prompt: its ids and positions copied in for this run only
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
            if "position_ids" in self.inputs:
                b.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
            self._step_bound = False
        if "attention_mask" in self.inputs:
            b.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        b.bind_output("logits", "cpu")  # unallocated: its shape is the run's; on the GPU, copied back
        if self.static_step:  # the next step binds its fixed buffers again
            self._step_bound = False
        try:
            self.session.run_with_iobinding(b, self._graph_runs[0])
        except Exception as e:  # noqa: BLE001 - ORT's own exception types
            raise GenerationError(f"the decoder rejected a decode step ({str(e).splitlines()[0][:200]}).") from None
        self.length = total
        if ragged:
            self.rows = self.rows + 1
        return b.get_outputs()[0].numpy()

    def cache(self) -> dict[str, np.ndarray]:
        """The KV cache as ``[batch, kv_heads, length, head_dim]`` host arrays (views of the CPU buffers in
        place; copies of the GPU ones). With rows of different lengths, a row's entries past its own
        length (``rows``) are padding."""
        if self._buffers:
            host = {n: b.numpy() if self.buffer_device else b for n, b in self._buffers.items()}
            return {n: b[:, :, : self.length] for n, b in host.items()}
        return dict(self.past)

    def prefill(self, ids: np.ndarray, last_only: bool = False, lengths: Any = None) -> np.ndarray:
        """Reset the cache, run the prompt ``[batch, seq]``; returns all logits ``[batch, seq, vocab]``,
        or with ``last_only`` those of each row's last position ``[batch, 1, vocab]`` (computed alone when
        the graph has a ``logits_to_keep`` input and the rows are whole).

        ``lengths`` gives each row's prompt length when the rows are right-padded to ``seq`` (prompts of
        different lengths in one batch); the padding's logits are meaningless. That needs the fused
        graph (GroupQueryAttention reads each row's length off ``attention_mask``)."""
        ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
        batch, seq = ids.shape
        rows = self._row_lengths(lengths, batch, seq)
        zero = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        self.past = {n: zero for n in self.past_names}
        self._binding, self._buffers, self._capacity = None, {}, 0
        self.length, self.rows = 0, rows
        if self.in_place and self.prefill_in_place:
            logits = self._run_bound(ids, rows)  # every position's logits: a bound run can't set logits_to_keep
        else:
            logits = self._run(ids, last_only and rows is None, rows)
        if rows is not None:
            return logits[np.arange(batch), rows - 1][:, None] if last_only else logits
        return logits[:, -1:] if last_only else logits

    def _row_lengths(self, lengths: Any, batch: int, seq: int) -> np.ndarray | None:
        """Per-row prompt lengths, or None when every row is whole."""
        if lengths is None:
            return None
        rows = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if rows.shape[0] != batch or rows.min() < 1 or rows.max() > seq:
            raise GenerationError(f"lengths {rows.tolist()} must give each of the {batch} rows a length in 1..{seq}.")
        if (rows == seq).all():
            return None
        if not self.in_place or "attention_mask" not in self.inputs:
            raise GenerationError(
                "prompts of different lengths in one batch need the fused graph (compile.fuse: GroupQueryAttention "
                "reads each row's length off attention_mask). Run them one by one, or fuse the model."
            )
        return rows

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One new token per sequence; returns its logits ``[batch, vocab]``."""
        if not self.past and not self._buffers:
            raise GenerationError("step() before prefill(): there is no KV cache to extend. Run the prompt first.")
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if self.in_place:
            return self._run_bound(tokens)[:, -1]
        return self._run(tokens)[:, -1]

    def generate(
        self,
        ids: np.ndarray,
        sampling: Sampling,
        on_token: Callable[[np.ndarray], Any] | None = None,
        lengths: Any = None,
    ) -> np.ndarray:
        """New tokens ``[batch, n]`` (n <= max_new_tokens); a finished sequence keeps emitting its EOS.
        ``lengths``: each row's prompt length when the prompts are right-padded (see ``prefill``)."""
        if sampling.prompt_lookup:
            return self._generate_lookup(np.atleast_2d(np.asarray(ids, dtype=np.int64)), sampling, on_token, lengths)
        rng = np.random.default_rng(sampling.seed)
        self.reserve = sampling.max_new_tokens
        logits = self.prefill(ids, last_only=True, lengths=lengths)[:, -1]
        done = np.zeros(logits.shape[0], bool)
        out = []
        for i in range(sampling.max_new_tokens):
            token = pick(logits, sampling, rng)
            if sampling.eos_ids:
                token = np.where(done, next(iter(sampling.eos_ids)), token)
                done |= np.isin(token, list(sampling.eos_ids))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if done.all() or i == sampling.max_new_tokens - 1:
                break
            logits = self.step(token)
        return np.stack(out, axis=1) if out else np.zeros((len(done), 0), np.int64)

    # -- exact greedy speculative decoding with prompt-lookup drafts ---------------------------------

    def _generate_lookup(
        self, ids: np.ndarray, sampling: Sampling, on_token: Callable[[np.ndarray], Any] | None, lengths: Any
    ) -> np.ndarray:
        """Greedy decoding that emits several tokens per run when the output repeats earlier text.

        Each step drafts up to ``prompt_lookup`` tokens: what followed the last occurrence of the
        current trailing n-gram (3, then 2, then 1 token) in the prompt and output so far. One run
        scores the pending token and the drafts together; the drafts the model would have picked
        itself are kept, the KV cache is cut back after the last kept one, and the model's own pick
        at the first miss becomes the next pending token.

        Greedy, so the tokens are the plain loop's wherever a position's logits don't depend on how many
        tokens run together: fp32 and fp16 graphs, int4 with ``accuracy_level`` 0 (measured identical on
        SmolLM2). With ``accuracy_level: 4`` or slimline's MatMulQ4 (``exact_multi_token`` False) the
        activations go to int8, and a rounding that the multi-token run's last-bit differences flip
        changes the logits (by ~1 on SmolLM2), so the continuation is the model's but can part from the
        one-token loop's (on smollm2-int4 in MatMulNBits, after 11 to
        30 tokens on four prompts); a warning says so."""
        if sampling.do_sample or ids.shape[0] != 1 or lengths is not None:
            raise GenerationError(
                "prompt_lookup is exact greedy speculative decoding: it needs greedy decoding (no sampling) of one "
                "prompt at a time."
            )
        if not self.exact_multi_token:
            import warnings

            warnings.warn(
                "prompt_lookup on a graph whose int4 matmuls quantize activations to int8 (MatMulNBits at accuracy_level "
                "4, or slimline's MatMulQ4): a draft run's logits can differ from single steps', so the tokens can differ "
                "from plain greedy decoding's (build with kernel: ort and accuracy_level: 0 for identical tokens, at a "
                "slower kernel).",
                stacklevel=3,
            )
        self.reserve = sampling.max_new_tokens + sampling.prompt_lookup
        logits = self.prefill(ids, last_only=True)[:, -1]
        history = [int(t) for t in ids[0]]
        out: list[int] = []
        token = int(logits[0].argmax())
        self.lookup_stats = {"runs": 0, "drafted": 0, "accepted": 0}
        while True:
            emit = [token]
            done = token in sampling.eos_ids or len(out) + 1 >= sampling.max_new_tokens
            if not done:
                room = sampling.max_new_tokens - len(out) - 1
                draft = lookup_draft(history + [token], min(sampling.prompt_lookup, room))
                start = self.length
                if draft:
                    scores = self.verify(np.array([[token, *draft]], np.int64))
                    picks = scores.argmax(-1)
                    kept = 0
                    while kept < len(draft) and draft[kept] == picks[kept]:
                        kept += 1
                    self.rollback(start + 1 + kept)
                    emit += draft[:kept]
                    token = int(picks[kept])
                    self.lookup_stats["drafted"] += len(draft)
                    self.lookup_stats["accepted"] += kept
                else:
                    token = int(self.step(np.array([emit[0]]))[0].argmax())
                self.lookup_stats["runs"] += 1
            for t in emit:
                out.append(t)
                history.append(t)
                if on_token is not None:
                    on_token(np.array([t]))
                if t in sampling.eos_ids or len(out) >= sampling.max_new_tokens:
                    return np.array([out], np.int64)
            if done:
                return np.array([out], np.int64)

    def verify(self, tokens: np.ndarray) -> np.ndarray:
        """Logits ``[n, vocab]`` of ``tokens [1, n]`` run after the cache (which then holds them too)."""
        if not self.past and not self._buffers:
            raise GenerationError("verify() before prefill(): there is no KV cache to extend. Run the prompt first.")
        logits = self._run_bound(tokens) if self.in_place else self._run(tokens)
        return logits[0]

    def rollback(self, length: int) -> None:
        """Forget the cache past ``length`` positions (drafts the model did not keep). The in-place buffers
        keep the stale entries, which the mask hides and the next run overwrites."""
        if not 0 < length <= self.length:
            raise GenerationError(f"can't roll the KV cache back to {length} positions: it holds {self.length}.")
        if not self.in_place:
            self.past = {k: v[:, :, :length] for k, v in self.past.items()}
        self.length = length


def lookup_draft(history: list[int], k: int, ngrams: tuple[int, ...] = (3, 2, 1)) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the trailing n-gram."""
    if k <= 0:
        return []
    n_hist = len(history)
    for n in ngrams:
        if n_hist <= n:
            continue
        tail = history[-n:]
        for start in range(n_hist - n - 1, -1, -1):
            if history[start : start + n] == tail:
                return history[start + n : start + n + k]
    return []


def _mask(lengths: np.ndarray, total: int) -> np.ndarray:
    """``[batch, total]`` ones over each row's first ``lengths`` positions (right padding)."""
    return (np.arange(total)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def keeps_last_logits(session: Any) -> bool:
    """Whether the graph has compile.export's ``logits_to_keep`` input (an overridable initializer)."""
    return any(i.name == LOGITS_TO_KEEP for i in session.get_overridable_initializers())


def _int8_activation_matmuls(path: Path) -> bool:
    """Whether the graph quantizes activations to int8 on the CPU: MatMulNBits at accuracy_level 4, or
    slimline's MatMulQ4 / MatMulQ8 (always). MatMulQ4 quantizes each row on its own, so its rows don't depend on
    the run's length, but the float ops around it (attention over one query or several) differ in the
    last bits, and an int8 rounding that flips amplifies that: on SmolLM2 a decode step's logits and
    the same position's in a multi-token run differ by ~1 (of ~30)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ORT loaded it; unreadable here means unknown: assume not exact
        return True
    return any(
        n.op_type in ("MatMulQ4", "MatMulQ8")
        or (n.op_type == "MatMulNBits" and any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute))
        for n in graph.node
    )


def in_place_cache(path: Path, past_names: list[str]) -> bool:
    """Whether every reader of the past KV inputs is GroupQueryAttention (which can append in place)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ORT loaded it; a proto we can't read just keeps the copying path
        return False
    wanted = set(past_names)
    readers = [n for n in graph.node if wanted & set(n.input)]
    return bool(readers) and all(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in readers)


def kv_dims(shape: list, folder: Path) -> tuple[int, int]:
    """KV heads and head dim of a ``[batch, kv_heads, past, head_dim]`` cache input; symbolic dims are read
    from the folder's config.json (transformers) or genai_config.json (onnxruntime-genai)."""
    import json

    kv, hd = shape[1], shape[3]
    if isinstance(kv, int) and isinstance(hd, int):
        return kv, hd
    if (folder / "genai_config.json").is_file():
        d = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        return int(d["num_key_value_heads"]), int(d["head_size"])
    if (folder / "config.json").is_file():
        c = json.loads((folder / "config.json").read_text())
        heads = c["num_attention_heads"]
        return int(c.get("num_key_value_heads") or heads), int(c.get("head_dim") or c["hidden_size"] // heads)
    raise GenerationError(f"{folder}: the KV cache's head count/size are symbolic and no config.json says what they are.")


def pick(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Greedy, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    if not s.do_sample:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / max(s.temperature, 1e-5)
    if s.top_k:
        kth = np.sort(z, axis=-1)[:, -s.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if s.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < s.top_p
        mask = np.zeros_like(p, bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def eos_ids(tokenizer: Any, config: Any) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids
