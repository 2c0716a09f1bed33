"""Where a model runs: ``ort-cpu``, ``ort-cuda``, ``torch-cpu``, ``torch-cuda``.

A runner returns the model's first output (token states or logits) as float32 numpy for fidelity,
and makes *timers* for speed: a timer holds its inputs already where the model reads them (on the
GPU for CUDA targets, bound through ORT's IO binding) and returns the seconds of one run. CUDA
timers use CUDA events (torch) or a synchronous IO-bound run (ORT), after warm-up like every timer.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimline.runtime import Feeds, ort_session

TARGET_DEVICE = {"ort-cpu": "cpu", "torch-cpu": "cpu", "ort-cuda": "cuda", "torch-cuda": "cuda"}


@dataclass
class Runner:
    name: str  # baseline@torch-cpu | compressed@ort-cpu | ...
    target: str
    run: Callable[[Feeds], np.ndarray]
    input_names: list[str]
    make_timer: Callable[[Feeds], Callable[[], float]]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return TARGET_DEVICE[self.target]


def _wall_timer(run: Callable[[Feeds], Any]) -> Callable[[Feeds], Callable[[], float]]:
    def make(feeds: Feeds) -> Callable[[], float]:
        def once() -> float:
            t0 = time.perf_counter()
            run(feeds)
            return time.perf_counter() - t0

        return once

    return make


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            return None
    return None


def available(target: str) -> tuple[bool, str]:
    """Whether ``target`` can run on this machine, and if not, why (one line for the report)."""
    if target in ("ort-cpu", "torch-cpu"):
        return True, ""
    if target == "torch-cuda":
        import torch

        if torch.cuda.is_available():
            return True, ""
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return False, f"torch {torch.__version__} ({build}) sees no CUDA device"
    if target == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, (
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider; install the `gpu` extra "
                "(onnxruntime-gpu) on a machine with an NVIDIA GPU"
            )
        if gpu_name() is None:
            return False, "onnxruntime-gpu is installed but no NVIDIA GPU answers nvidia-smi"
        return True, ""
    return False, f"unknown target {target}"


def _torch_forward(model: Any) -> tuple[Callable[[dict], Any], list[str]]:
    import torch

    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

    def forward(tensors: dict) -> Any:
        with torch.inference_mode():
            return model(**{k: v for k, v in tensors.items() if k in accepted})[0]

    return forward, names


def torch_runner(model: Any, name: str, threads: int, target: str = "torch-cpu") -> Runner:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    device = TARGET_DEVICE[target]
    if device == "cuda":
        if any(p.device.type != "cuda" for p in model.parameters()):
            model = copy.deepcopy(model).to("cuda")
    forward, names = _torch_forward(model)

    def run(feeds: Feeds) -> np.ndarray:
        out = forward({k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
        return out.float().cpu().numpy()

    make_timer = _wall_timer(run)
    details: dict[str, Any] = {"library": f"torch {torch.__version__}", "dtype": str(next(model.parameters()).dtype)}
    if device == "cuda":
        details.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, timing="CUDA events")

        def make_timer(feeds: Feeds) -> Callable[[], float]:  # noqa: F811 - the CUDA version
            on_gpu = {k: torch.from_numpy(v).to("cuda") for k, v in feeds.items()}
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def once() -> float:
                start.record()
                forward(on_gpu)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1000

            return once
    else:
        details.update(device="cpu", threads=torch.get_num_threads(), timing="perf_counter")
    return Runner(name, target, run, names, make_timer, details)


def ort_runner(path: Path, name: str, threads: int, target: str = "ort-cpu") -> Runner:
    import onnxruntime as ort

    n = threads or os.cpu_count() or 1
    cuda = target == "ort-cuda"
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    # Timed side by side with the baseline: ORT's spinning threads would otherwise take the cores of
    # the baseline's next run (measured: torch fp32 MiniLM b32 5% slower, speedup 3.34x -> 3.18x honest)
    session = ort_session(path, n, providers, spinning=False)
    if cuda and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"ONNX Runtime fell back to {session.get_providers()} instead of the CUDA EP")
    inputs = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name

    details: dict[str, Any] = {"library": f"onnxruntime {ort.__version__}", "provider": session.get_providers()[0]}

    def run(feeds: Feeds) -> np.ndarray:
        given = {k: feeds[k] for k in inputs}
        if cuda and "cpu_fallback_nodes" not in details:  # each node's provider, from ORT's profile of one run
            from slimline.evaluate.placement import placement

            placed = placement(path, providers, given, n).summary()
            details["cpu_fallback_nodes"] = placed.pop("cpu_fallback_nodes")
            details["placement"] = placed
        return session.run([output], given)[0]

    make_timer = _wall_timer(run)
    if cuda:
        details.update(device=gpu_name(), timing="IO binding (inputs and outputs stay on the GPU), synchronous run")

        def make_timer(feeds: Feeds) -> Callable[[], float]:  # noqa: F811 - the IO-bound version
            binding = session.io_binding()
            for k in inputs:
                binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(feeds[k], "cuda", 0))
            binding.bind_output(output, "cuda")

            def once() -> float:
                t0 = time.perf_counter()
                session.run_with_iobinding(binding)  # synchronizes the CUDA stream before returning
                return time.perf_counter() - t0

            return once
    else:
        details.update(device="cpu", threads=n, timing="perf_counter")
    return Runner(name, target, run, inputs, make_timer, details)
