#!/usr/bin/env bash
# The transformers integration on the 4.x line: the integration tests again under transformers
# 4.57.6 (the last 4.x), in a small venv laid over the project's (its own transformers, tokenizers
# and huggingface_hub; everything else, pvq_cuda included, from the base venv). Cached beside it.
# Usage (from the repo root, with the project's venv active):  bash tests/envs/transformers-4.57.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OVERLAY="${PVQ_TRANSFORMERS4_VENV:-$(dirname "$(dirname "$(dirname "$BASE")")")-transformers-4.57}"
if [ ! -f "$OVERLAY/.complete" ]; then
  rm -rf "$OVERLAY"
  python -m venv "$OVERLAY"
  OWN=$("$OVERLAY/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # After the overlay's own packages on sys.path; addsitedir also reads the base's own .pth files.
  echo "import site; site.addsitedir('$BASE')" > "$OWN/base-venv.pth"
  "$OVERLAY/bin/python" -m pip install -q --no-deps transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.2
  touch "$OVERLAY/.complete"
fi
"$OVERLAY/bin/python" -c 'import transformers; assert transformers.__version__ == "4.57.6", transformers.__version__'
"$OVERLAY/bin/python" -m pytest -q -p no:cacheprovider tests/test_integration_transformers.py \
  tests/test_integration_peft.py tests/test_atomic_save.py
