"""The house stays one-way: import-linter's contracts (pyproject.toml) hold, and every module of the
package sits in one of their layers, so a new module can't slip past them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

import slimline

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_every_module_is_in_a_layer():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in config if c["type"] == "layers")
    placed = [name.strip() for layer in layers for name in layer.split("|")]
    package = Path(slimline.__file__).parent
    top = {f"slimline.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    top |= {f"slimline.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(top - set(placed)) == [], "modules outside every layer: add them to [tool.importlinter] in pyproject.toml"
    assert len(placed) == len(set(placed)), "a module is in two layers"
