"""Plots for BENCHMARKS.md from the benchmarks' --json files.

    python -m benchmarks.plot --loss a.json[,b.json] --rollout r.json --out docs/images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20


def plot_loss(paths: list[str], out: Path) -> Path:
    """Time per call and extra peak memory against N, one line per method, one column per divergence."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"] if "seconds" in r]
    machine = json.loads(Path(paths[0]).read_text())["machine"]
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for col, kind in enumerate(kinds):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["n"], r["seconds"], r["peak_bytes"]) for r in rows
                         if r["kind"] == kind and r["method"] == method)
            if not pts:
                continue
            n, t, m = zip(*pts)
            style = {"linestyle": "--", "color": "gray"} if method == "floor" else {}
            axes[0, col].plot(n, [x * 1e3 for x in t], marker="o", label=method, **style)
            axes[1, col].plot(n, [x / MIB for x in m], marker="o", label=method, **style)
        v, h = rows[0]["v"], rows[0]["h"]
        axes[0, col].set_title(f"{kind}, V={v}, H={h}: forward + backward")
        axes[0, col].set_ylabel("ms per call")
        axes[1, col].set_ylabel("extra peak MiB (peak RSS over inputs)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.grid(alpha=0.3)
        axes[0, col].legend(fontsize=8)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    path = out / "bench_loss.png"
    fig.savefig(path, dpi=110)
    return path


def plot_rollout(path: str, out: Path) -> Path:
    data = json.loads(Path(path).read_text())
    batch = [r["batch"] for r in data["rows"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = {"generate": "HF generate", "ours": "mmopd rollout (hf engine)", "vllm": "vLLM (colocated)"}
    for name, label in labels.items():
        if name in data["rows"][0]["tokens_per_s"]:
            ax.plot(batch, [r["tokens_per_s"][name] for r in data["rows"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"rollout, random Qwen2.5-shaped {data['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.text(0.01, 0.01, data["machine"], fontsize=6)
    fig.tight_layout()
    target = out / "bench_rollout.png"
    fig.savefig(target, dpi=110)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="")
    parser.add_argument("--rollout", default="")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.loss:
        print(plot_loss(args.loss.split(","), out))
    if args.rollout:
        print(plot_rollout(args.rollout, out))


if __name__ == "__main__":
    main()
