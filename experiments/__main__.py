"""`python -m experiments NAME [--out DIR] [--size tiny|full] [--publish]`"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

EXPERIMENTS = ("compute_matched", "compute_matched_vlm", "compute_matched_image", "estimator", "estimator_tail",
               "sampled_estimator", "self_distill", "published_regime", "mode_seeking", "forgetting", "cfg_distill",
               "moe_routing", "sparse_teacher", "privileged_teacher", "task_rewards")
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    parser.add_argument("name", choices=EXPERIMENTS)
    parser.add_argument("--out", default="runs/experiments", help="runs and results (shared by the text "
                        "experiments: the toy and each run are built once and reused)")
    parser.add_argument("--size", choices=("tiny", "full"), default="full",
                        help="tiny: random models, a few steps (a smoke test); full: the RESULTS.md numbers")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the plot to docs/images/ and the results to docs/results/")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    module = importlib.import_module(f"experiments.{args.name}")
    module.run(Path(args.out), args.size, ROOT if args.publish else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
