"""Where downloaded text and converted models live: ``$PVQ_CUDA_CACHE``, else ``~/.cache/pvq_cuda``
(never inside the repository)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("PVQ_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pvq_cuda"
