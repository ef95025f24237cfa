#!/usr/bin/env bash
# The GPU check on a bare GPU machine (its image's Python with CUDA torch; no internet): installs the kit of
# wheels that `make gpu-kit` put in .whl/ into a temporary folder (pip --no-index --no-deps --target; nothing
# is downloaded), puts it and the repository first on PYTHONPATH, and runs every stage of `python -m
# rntp.tools.gpu_check` (arguments are passed on). The report: gpu-check/report.json, a log per stage beside it.
#   bash launch/gpu_check.sh [--stages env,tests,train,attention,multi] [--limit train=300] [...]
# PYTHON overrides the interpreter (default: the image's /opt/torch/.venv/bin/python3, else python3); KIT the
# wheel folder; DRY_RUN=1 prints the commands instead.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x /opt/torch/.venv/bin/python3 ]]; then PYTHON=/opt/torch/.venv/bin/python3; else PYTHON=python3; fi
fi
KIT=${KIT:-$ROOT/.whl}
SITE=${RNTP_KIT:-$(mktemp -d "${TMPDIR:-/tmp}/rntp-kit.XXXXXX")}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "$*"; else "$@"; fi; }
shopt -s nullglob
wheels=("$KIT"/*.whl)
if (( ${#wheels[@]} )); then
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$SITE" "${wheels[@]}"
  else  # no pip in the image: a wheel is a zip archive of what --target would hold
    run "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "${wheels[@]}"
  fi
  echo "kit: ${#wheels[@]} wheels from $KIT installed in $SITE"
else
  echo "no wheels in $KIT (make gpu-kit): the check runs on the image's packages alone" >&2
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RNTP_KIT="$SITE" HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
run "$PYTHON" -m rntp.tools.gpu_check "$@"
