"""Add sha256 hashes to the lock files, so pip installs exactly the files that were locked.

    .venv/bin/python requirements/hash_lock.py            # rewrites requirements/lock.txt and dev.txt

For each ``name==version`` line it lists every file of that release on PyPI (the simple API's JSON
form carries each file's sha256), plus the files of that version in the local wheel folders and
mirrors that pip on this machine is configured to read (``find-links`` / file:// ``extra-index-url``).
torch is the exception: only the local CPU build (``torch-2.13.0+cpu``, on this machine kind's disk and
nowhere on PyPI) is listed, so pip can't take PyPI's CUDA build instead. With any hash
present pip runs in hash-checking mode: a file whose bytes differ from every listed hash is refused.
Run it after changing a pin; it needs the network to reach pypi.org.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)")


def release_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        if filename.endswith((".tar.gz", ".zip")):
            return parse_sdist_filename(filename)[1]
    except Exception:  # noqa: BLE001 - a file name that isn't a valid distribution name is skipped
        return None
    return None


def matches(filename: str, version: str) -> bool:
    found = release_version(filename)
    return found is not None and Version(found.base_version if found.local else str(found)) == Version(version)


def pypi_hashes(name: str, version: str) -> set[str]:
    request = urllib.request.Request(
        f"https://pypi.org/simple/{canonicalize_name(name)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    return {f["hashes"]["sha256"] for f in files if matches(f["filename"], version) and "sha256" in f.get("hashes", {})}


def pip_config() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    return {k.split(".", 1)[-1]: v.strip("'") for k, _, v in (line.partition("=") for line in out.splitlines()) if v}


def local_hashes(name: str, version: str) -> set[str]:
    config = pip_config()
    hashes: set[str] = set()
    for folder in config.get("find-links", "").split():
        for path in Path(folder).glob("*"):
            if canonicalize_name(path.name.split("-")[0]) == canonicalize_name(name) and matches(path.name, version):
                hashes.add(hashlib.sha256(path.read_bytes()).hexdigest())
    for index in config.get("extra-index-url", "").split():
        if not index.startswith("file://"):
            continue
        page = Path(index[7:]) / canonicalize_name(name) / "index.html"
        if page.is_file():
            for filename, digest in re.findall(r'href="[^"#]*/([^"#/]+)#sha256=([0-9a-f]{64})"', page.read_text()):
                if matches(filename, version):
                    hashes.add(digest)
    return hashes


def hash_file(path: Path) -> None:
    lines, out = path.read_text().splitlines(), []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("--hash") or stripped == "\\":
            continue  # an earlier run's hashes: replaced below
        match = PIN.match(stripped)
        if not match:
            out.append(line)
            continue
        name, version = match.groups()
        local = local_hashes(name, version)
        if canonicalize_name(name) == "torch" and local:
            # Only the local CPU build: pip prefers files whose index link carries an allowed hash, so
            # with PyPI's hashes listed it took PyPI's torch 2.13.0 (a CUDA build, whose libraries
            # --no-deps leaves out) over the local 2.13.0+cpu file, whose link carries none.
            hashes = sorted(local)
        else:
            hashes = sorted(pypi_hashes(name, version) | local)
        if not hashes:
            raise SystemExit(f"{path.name}: no files found for {name}=={version}")
        out.append(f"{name}=={version} \\")
        out += [f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "") for i, h in enumerate(hashes)]
        print(f"{name}=={version}: {len(hashes)} files", flush=True)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    for lock in ("lock.txt", "dev.txt"):
        hash_file(ROOT / lock)
