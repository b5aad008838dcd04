"""Compute-matched comparison of the objectives on the VLM toy (see compute_matched).

    python -m experiments compute_matched_vlm [--out DIR] [--size tiny|full] [--publish]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.compute_matched import run_modality


def run(out: Path, size: str, root: Path | None) -> dict[str, Any]:
    return run_modality(out, size, root, "vlm")
