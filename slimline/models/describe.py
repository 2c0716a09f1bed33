"""What a model is and what slimline can do with it, read from its files without loading its weights.

``describe_model(source)`` reads config.json (or a GGUF file's header) and the safetensors headers
(shapes only) of a local folder, a ``pip:`` package, a GGUF file, or an ``hf:`` repository (its
config and index only, from the cache or the hub). It reports the family, the size, the stages and
fusions that apply, what is unsupported and why, and the memory a run will need.

``refusals(source, task, stages)`` is the part a run checks before it loads anything. It names each
reason the run can't work, with the fix:
- an architecture no stage supports;
- a task the checkpoint has no head for (transformers would make a random one);
- missing tokenizer files;
- a vocabulary larger than the model's embedding table.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from slimline.errors import ModelError
from slimline.family import KNOWN_DECODERS, KNOWN_ENCODERS, expected_fusions, family_of, layer_count

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json", "sentencepiece.bpe.model")
HEADS = {  # the head each task needs, by the suffix of transformers' architecture names
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "text-generation": ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
}


def _guess_task(architectures: list[str]) -> str:
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForTokenClassification"):
            return "token-classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
    return "feature-extraction"


def _safetensors_params(folder: Path) -> int | None:
    """Parameter count from the safetensors headers (8-byte length, then JSON of dtypes and shapes)."""
    total, found = 0, False
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > 100_000_000:
                    return None
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                n = 1
                for d in entry.get("shape", []):
                    n *= int(d)
                total += n
                found = True
    return total if found else None


# GGUF architecture -> the transformers model_type it loads as, where they differ (a GGUF `gemma3` is the
# text decoder; its vision tower, if any, ships in a separate mmproj file)
GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def _gguf(path: Path) -> dict[str, Any]:
    """The architecture, layer count and parameter count in a GGUF file's header (tensors stay mapped)."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as many types
        raise ModelError(f"{path}: not a readable GGUF file ({str(err)[:120]}).") from None

    def field(name: str) -> Any:
        f = reader.get_field(name)
        if f is None:
            return None
        value = f.parts[f.data[0]] if f.data else None
        if value is not None and getattr(value, "dtype", None) is not None and value.dtype.kind in "u":
            try:
                return bytes(value).decode("utf-8") if value.dtype.itemsize == 1 else int(value[0])
            except UnicodeDecodeError:
                return int(value[0])
        return int(value[0]) if value is not None and len(value) == 1 else value

    arch = field("general.architecture")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {
        "model_type": GGUF_MODEL_TYPES.get(arch, arch),
        "gguf_architecture": arch,
        "layers": field(f"{arch}.block_count") if arch else None,
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "gguf_tensor_types": types,
    }


def _config_and_folder(source: str) -> tuple[dict[str, Any], Path | None, str]:
    """(config as a dict, the local folder or GGUF file, its format) for any model source."""
    from slimline.models.loader import resolve_source

    if source.startswith("hf:"):
        from huggingface_hub import hf_hub_download

        repo, _, revision = source[3:].partition("@")
        try:
            config_path = Path(hf_hub_download(repo, "config.json", revision=revision or None))
        except Exception as err:  # noqa: BLE001 - offline, not found, ...: all say the same to the user
            raise ModelError(
                f"model.source `{source}`: can't read its config.json from the hub or the cache ({str(err)[:160]})."
            ) from None
        return json.loads(config_path.read_text()), config_path.parent, "hf-repository"
    where = resolve_source(source)
    assert isinstance(where, Path)
    if where.suffix == ".gguf":
        return {}, where, "gguf"
    try:
        config = json.loads((where / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{where / 'config.json'}: not readable JSON ({str(err)[:120]}). Is the folder complete?") from None
    if not isinstance(config, dict):
        raise ModelError(f"{where / 'config.json'}: must be a JSON object.")
    return config, where, "hf-folder"


def describe_model(source: str, task: str | None = None) -> dict[str, Any]:
    """Everything slimline can tell about a model without loading its weights."""
    config, where, fmt = _config_and_folder(source)
    info: dict[str, Any] = {"source": source, "path": str(where), "format": fmt}
    if fmt == "gguf":
        info.update(_gguf(where))
        info["task"] = task or "text-generation"
        info["size_mb"] = round(where.stat().st_size / 1e6, 1)
        cfg = None
    else:
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.for_model(**config) if "model_type" in config else None
        except (ValueError, KeyError, TypeError):
            cfg = None
        architectures = config.get("architectures") or []
        info.update(
            {
                "model_type": config.get("model_type"),
                "architectures": architectures,
                "task": task or _guess_task(architectures),
                "layers": layer_count(cfg) if cfg is not None else None,
                "hidden_size": config.get("hidden_size") or config.get("dim") or config.get("n_embd"),
                "heads": config.get("num_attention_heads") or config.get("n_heads") or config.get("n_head"),
                "kv_heads": config.get("num_key_value_heads"),
                "vocab_size": config.get("vocab_size"),
                "max_positions": config.get("max_position_embeddings") or config.get("n_positions"),
                "rope_scaling": _rope_kind(config.get("rope_scaling")),
                "parameters": _safetensors_params(where) if where is not None and where.is_dir() else None,
            }
        )
        if where is not None and where.is_dir():
            weights = [p for p in where.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
            info["size_mb"] = round(sum(p.stat().st_size for p in weights) / 1e6, 1)
            info["tokenizer_files"] = sorted(p.name for p in where.iterdir() if p.name in TOKENIZER_FILES)
            info["tokenizer_size"] = tokenizer_size(where)
    family = family_of(info["task"])
    info["family"] = family.name
    supported = KNOWN_DECODERS if family.is_decoder else KNOWN_ENCODERS
    info["supported"] = info.get("model_type") in supported
    params = info.get("parameters")
    if params:
        info["memory_mb"] = {
            "float32_weights": round(params * 4 / 2**20),
            "run_peak_estimate": round(params * 4 * 3 / 2**20),  # the torch model, its export, and the graph being rewritten
        }
    if cfg is None and fmt == "gguf" and info.get("layers"):
        from types import SimpleNamespace

        cfg = SimpleNamespace(model_type=info.get("model_type"), num_hidden_layers=info["layers"])
    if cfg is not None:
        contract, how = expected_fusions(family, cfg)
        info["fusions"] = {"expected": contract, "how": how}
    info["unsupported"] = [r["why"] for r in _problems(info, family)]
    return info


def _rope_kind(scaling: Any) -> str | None:
    """The rotary scaling type of a config's ``rope_scaling`` ("longrope", "dynamic", "llama3", ...)."""
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    return str(kind) if kind else None


def tokenizer_size(folder: Path) -> int | None:
    """How many token ids the folder's tokenizer can produce (its largest id + 1), read from
    tokenizer.json, vocab.json or vocab.txt; None when none is there or it can't be read."""
    try:
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab") or {}
            ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
            ids += [t.get("id", 0) for t in data.get("added_tokens") or []]
            return max(ids) + 1 if ids else None
        if (folder / "vocab.json").is_file():
            ids = list(json.loads((folder / "vocab.json").read_text(encoding="utf-8")).values())
            return max(ids) + 1 if ids else None
        if (folder / "vocab.txt").is_file():
            return sum(1 for line in (folder / "vocab.txt").read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def _problems(info: dict[str, Any], family: Any) -> list[dict[str, str]]:
    out = []
    model_type = info.get("model_type")
    if model_type == "gemma3":
        out.append(
            {
                "stage": "model.load",
                "why": "a Gemma 3 multimodal checkpoint (`gemma3`, a vision tower and a text decoder); slimline "
                "compresses the text decoder of Gemma 3 text checkpoints (`gemma3_text`, e.g. Gemma 3 1B)",
                "fix": "use a text-only Gemma 3 checkpoint, or save the language model on its own "
                "(Gemma3ForCausalLM) and point model.source at that folder",
            }
        )
    elif family.is_decoder and model_type not in KNOWN_DECODERS:
        out.append(
            {
                "stage": "compile.export",
                "why": f"a `{model_type}` decoder: export with its KV cache, fusion and int4 support "
                f"{', '.join(KNOWN_DECODERS)} today",
                "fix": "use a model of a supported type, or a torch target (torch-cpu) without compile.export",
            }
        )
    if not family.is_decoder and model_type not in KNOWN_ENCODERS:
        out.append(
            {
                "stage": "compile.fuse",
                "why": f"a `{model_type}` encoder: slimline's fusion rules and contract are checked on "
                f"{', '.join(KNOWN_ENCODERS)}; other encoders export but may fuse little (expect: auto checks nothing)",
                "fix": "run it with a written `expect` (or none), and see `slimline inspect --fusions` on its export",
                "warning": "yes",
            }
        )
    head = HEADS.get(info["task"])
    architectures = info.get("architectures")
    if head and architectures and not any(a.endswith(head) for a in architectures):
        out.append(
            {
                "stage": "model.load",
                "why": f"model.task {info['task']}, but the checkpoint has no such head (architectures: {', '.join(architectures)}); "
                "transformers would add one with random weights",
                "fix": "use the checkpoint fine-tuned for that task, or model.task: feature-extraction",
            }
        )
    if family.is_decoder and info.get("rope_scaling") == "longrope":
        out.append(
            {
                "stage": "compile.fuse",
                "why": "LongRoPE: the export keeps the original rotary frequencies (exact up to the pre-training length, "
                "where the artifact is capped), but its rotary tables, scaled by the LongRoPE attention factor, don't "
                "fuse to GroupQueryAttention yet, so `expect: auto` fails the contract",
                "fix": "run with `--set stages.1.compile.fuse.expect={}` (attention unfused, slower), or use the "
                "model's short-context variant",
                "warning": "yes",
            }
        )
    tokens, rows = info.get("tokenizer_size"), info.get("vocab_size")
    if isinstance(tokens, int) and isinstance(rows, int) and tokens > rows > 0:
        out.append(
            {
                "stage": "model.load",
                "why": f"the tokenizer has {tokens} token ids but the model's embedding table has {rows} rows "
                "(config.json vocab_size): ids past the table would index outside it",
                "fix": "use the tokenizer saved with this checkpoint, or resize the embeddings "
                "(model.resize_token_embeddings(len(tokenizer))) and save the model again",
            }
        )
    if info.get("format") == "hf-folder" and not info.get("tokenizer_files"):
        out.append(
            {
                "stage": "model.load",
                "why": "the folder has no tokenizer files (tokenizer.json, vocab.txt, tokenizer.model, ...)",
                "fix": "save the tokenizer beside the model: tokenizer.save_pretrained(folder)",
            }
        )
    return out


def refusals(source: str, task: str) -> list[dict[str, str]]:
    """The problems that stop a run on this model before anything loads (warnings left out)."""
    if source.startswith("hf:"):
        return []  # the hub's files are fetched with the weights; checked after loading
    info = describe_model(source, task)
    if info["format"] == "gguf":
        return []
    return [p for p in _problems(info, family_of(task)) if not p.get("warning")]
