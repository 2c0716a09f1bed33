"""YAML and configuration plumbing shared by the recipe and the CI gate: a safe YAML reader (duplicate
keys refused, alias expansion bounded), ``--set`` / ``--budget`` overrides, and pydantic errors
explained with their YAML path and a did-you-mean. Messages never echo unbounded input (``short``).
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel

from slimline.errors import RecipeError


def short(value: Any, limit: int = 80, as_repr: bool = False) -> str:
    """``value`` for an error message, never longer than ``limit`` characters: a message must not
    echo unbounded input (a YAML alias bomb expands to millions of items)."""
    text = value if isinstance(value, str) and not as_repr else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Any) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{match[0]}`?" if match else ""


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by following ``loc`` down from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), ann)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def explain_error(error: Any, root: type[BaseModel], prefix: str = "") -> str:
    loc = tuple(error["loc"])
    path = ".".join(p for p in (prefix, _format_loc(loc)) if p)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        fields = list(parent.model_fields) if parent else []
        hint = did_you_mean(loc[-1], fields)
        parent_path = ".".join(p for p in (prefix, _format_loc(loc[:-1])) if p) or "recipe"
        return f"{parent_path}: unknown key `{short(loc[-1])}`.{hint} Valid keys here: {', '.join(fields) or 'none'}."
    if kind == "missing":
        return f"{path}: required key is missing."
    if kind == "value_error":
        msg = short(error["msg"].removeprefix("Value error, "), 1000)
        return msg if msg.startswith("stages[") or msg.startswith("evaluate.") else f"{path}: {msg}"
    return f"{path}: {error['msg']} (got {short(error.get('input'), as_repr=True)})."


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.2.quantize.dynamic_int8.per_channel=false`` -> (path parts, YAML-typed value)."""
    if "=" not in text:
        raise RecipeError(f"--set {short(text)!r}: expected KEY=VALUE, e.g. --set evaluate.speed.repeats=5")
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {short(text)!r}: the key is empty")
    return parts, value


def _child(node: dict[str, Any], key: str) -> Any:
    if node.get(key) is None:  # absent, or `key:` with no value in YAML
        node[key] = {}
    return node[key]


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Apply one ``--set`` override to the raw recipe mapping, in place.

    Stage kinds contain a dot (``quantize.dynamic_int8``), so inside a stage item the next two parts
    name the kind when the joined name is the item's key.
    """
    parts, value = parse_override(text)
    node: Any = raw
    i = 0
    while i < len(parts) - 1:
        part = parts[i]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {short(text)}: `{part}` is not an index of a list of {len(node)} items")
            node = node[int(part)]
            if isinstance(node, dict) and len(node) == 1 and i + 2 < len(parts):
                kind = f"{parts[i + 1]}.{parts[i + 2]}"
                if kind in node:
                    node = _child(node, kind)
                    i += 3
                    continue
            i += 1
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {short(text)}: `{'.'.join(parts[:i])}` is a value, not a mapping")
        node = _child(node, part)
        i += 1
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError(f"--set {short(text)}: `{last}` is not an index of a list of {len(node)} items")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {short(text)}: `{'.'.join(parts[:-1])}` is a value, not a mapping")


MAX_YAML_VALUES = 100_000  # a recipe has a few hundred; aliases must not expand it past this


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last
    one silently, so a second `evaluate:` block would drop the first one's budgets)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key `{short(key)}` appears twice (first on line {first.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values ``node`` stands for once its aliases are expanded (memoized, so an alias bomb
    is measured without expanding it)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.YAMLError("a recursive alias (a value that contains itself)")
    open_.add(key)
    if isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(v, sizes, open_) for v in node.value)
    else:
        total = 1
    open_.discard(key)
    sizes[key] = min(total, 1 << 62)
    return sizes[key]


def parse_yaml(text: str) -> Any:
    """Safe YAML with duplicate keys refused and alias expansion bounded."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_YAML_VALUES:
            raise yaml.YAMLError(
                f"its anchors and aliases expand to {size:,} values (more than {MAX_YAML_VALUES:,}); a recipe is small, "
                "so this looks like an alias bomb"
            )
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as err:  # e.g. an integer of 5,000 digits
            raise yaml.YAMLError(f"a value can't be read ({short(str(err), 120)})") from None
    finally:
        loader.dispose()
