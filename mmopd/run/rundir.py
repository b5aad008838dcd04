"""An output directory a user can trust: one run at a time, no silent mixing of runs, no lost work.

`open_run` is the trainer's first move, before any model loads. It locks `train.out_dir` (`.lock` holds
the pid and the machine's name; a lock whose process is gone is taken over, one of another machine is refused, since
its pid cannot be checked from here), cleans up `.tmp-*` checkpoint dirs a killed write
left, and decides where the run starts:
- `train.resume: auto` continues from the newest *valid* checkpoint (an unusable newer one is named in a
  warning and skipped). The resolved config must be the checkpoint's, except for `SAFE_TO_CHANGE` keys
  and the keys listed in `train.resume_changes`; anything else is refused with each key's old → new value.
  A checkpoint written with another step order (`mmopd.data.step_order.STEP_ORDER`) is refused too.
- `train.resume: never` starts a new run; in a directory that already holds one, `train.existing` says
  whether to refuse (the default) or move the old contents to a sibling `NAME.old-N`.
Each segment (start or resume) appends its config and its changes to `segments.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from mmopd.config import Config, TrainConfig, config_from_dict, resume_keys
from mmopd.data.step_order import STEP_ORDER
from mmopd.models.checkpoint import MARKER, checkpoint_dir, complete_checkpoints, load_trainer_state

log = logging.getLogger("mmopd")

LOCK = ".lock"
SEGMENTS = "segments.jsonl"
# what a resumed run may change, from the roles the config's fields carry (mmopd.config.RESUME_ROLES):
# its length, evaluation and logging; the batch layout and model placement (when the trainer can check that the
# global batch stays; checkpoints record it as "global_batch"); never what the checkpoint's weights decide
SAFE_TO_CHANGE = resume_keys("safe")
LAYOUT = resume_keys("layout")
FIXED = resume_keys("fixed")


class RunDirError(ValueError):
    """An output directory that cannot be used as asked, with what to do instead."""


@dataclass
class Run:
    """Where a run starts: `resume_from` and its trainer `state`, or a new run (both None)."""

    out: Path
    run_id: str
    resume_from: Path | None = None
    state: dict[str, Any] | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (old, new), what this segment changed
    finished: dict[str, Any] | None = None  # the summary of a run that already did all its steps
    locked: bool = False

    def close(self) -> None:
        if self.locked:
            (self.out / LOCK).unlink(missing_ok=True)
            self.locked = False


def open_run(config: Config) -> Run:
    """Lock the directory, clean temp dirs, and find where this run starts (see module doc). Rank 0 of a run of
    several processes calls it for all of them (`mmopd.run.ranks.open_shared_run`)."""
    t = config.train
    out = Path(t.out_dir)
    run = Run(out, uuid.uuid4().hex)
    _lock(out)
    run.locked = True
    try:
        for tmp in checkpoint_dir(out).glob(".tmp-*"):
            log.warning("removing %s, left by a checkpoint write that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        if t.resume == "never":
            if holds_a_run(out):
                _make_room(out, t.existing)
            return run
        found = _newest_valid(out)
        if found is None:
            if holds_a_run(out):
                _check_same_run(_saved_config(out), config)
            return run
        run.resume_from, run.state = found
        old = run.state.get("config") or _saved_config(out)
        run.changes = _check_same_run(old, config, LAYOUT if "global_batch" in run.state else frozenset())
        run.run_id = run.state.get("run_id", run.run_id)
        done = run.state["step"]
        if t.steps < done:
            raise RunDirError(f"train.steps={t.steps} is fewer than the {done} steps {run.resume_from} has done; "
                              f"nothing to train. Set train.steps above {done} to continue this run, or start a "
                              "new one with another train.out_dir")
        if t.steps == done:
            run.finished = _finished_summary(out / "summary.json")
        if run.finished is None:
            _check_step_order(run.state.get("step_order"), run.resume_from)
        return run
    except BaseException:
        run.close()
        raise


def _finished_summary(path: Path) -> dict[str, Any] | None:
    """The summary of a run that did all its steps, or None where there is none to read: absent, or torn by a
    crash while it was written (the run then evaluates again from its last checkpoint and writes it whole)."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); evaluating the last checkpoint again to write it whole", path, err)
        return None
    if not isinstance(summary, dict):
        log.warning("%s holds no summary; evaluating the last checkpoint again to write it whole", path)
        return None
    return summary


def _check_step_order(saved: str | None, path: Path) -> None:
    """Refuse to continue a checkpoint whose run read its batches in another order: it would not be exact."""
    if saved != STEP_ORDER:
        written = f"the step order {saved!r}" if saved else "the stored torch.randperm step order of earlier mmopd"
        raise RunDirError(f"{path} was written with {written}, and this mmopd reads batches in the order "
                          f"{STEP_ORDER!r}, so the run cannot resume exactly; finish it with the mmopd that wrote "
                          "it, or start anew (train.resume=never with train.existing=move_aside)")


def record_segment(run: Run, config: Config) -> None:
    """Append this segment (its first step, its changes and its whole config) to segments.jsonl."""
    row = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": run.state["step"] if run.state else 0,
           "run_id": run.run_id, "changes": {k: list(v) for k, v in run.changes.items()},
           "config": config.to_dict()}
    with (run.out / SEGMENTS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def apply_resume_changes(run: Run, optimizer: Any, scheduler: Any, t: TrainConfig) -> None:
    """Make the accepted optimizer changes real (`t`: the run's train section): the resumed optimizer and scheduler
    carry the old values."""
    for key, (old, new) in run.changes.items():
        log.warning("resuming with %s changed: %r -> %r", key, old, new)
    if "train.lr" in run.changes:
        scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
        for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = t.lr
            group["lr"] = t.lr * lam(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if "train.weight_decay" in run.changes:
        for group in optimizer.param_groups:
            group["weight_decay"] = t.weight_decay


def holds_a_run(out: Path) -> bool:
    """Whether `out` holds a run's results (a config, metrics or checkpoints)."""
    root = checkpoint_dir(out)
    return any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", "summary.json")) or \
        (root.is_dir() and any(child.name.startswith("step-") for child in root.iterdir()))


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from, or None when it is whole."""
    if not (path / MARKER).is_file():
        return f"no {MARKER} marker"
    if not (path / "trainer_state.pt").is_file():
        return "trainer_state.pt is missing"
    model = path / "model"
    if not (model / "config.json").is_file():
        return "model/config.json is missing"
    weights = [*model.glob("*.safetensors"), *(path / "lora").glob("*.safetensors")]
    if not weights and not any(model.glob("*.bin")):
        return "model/ holds no weights"
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            return f"{file.relative_to(path)}: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (garbage, truncated), or None; reads only its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if names:
                f.get_slice(names[-1])
    except Exception as err:  # safetensors raises its own error type for every kind of damage
        return f"not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def _newest_valid(out: Path) -> tuple[Path, dict[str, Any]] | None:
    found = complete_checkpoints(out)
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        state = None
        if problem is None:
            try:
                state = load_trainer_state(path)
            except Exception as err:  # a torn pickle raises whatever its reader hits
                problem = f"trainer_state.pt cannot be read ({type(err).__name__}: {err})"
        if problem is None and state is not None:
            if problems:
                log.warning("resuming from %s instead: %s", path.name, "; ".join(problems))
            return path, state
        problems.append(f"{path} is unusable ({problem})")
    if problems:
        raise RunDirError(f"no checkpoint in {checkpoint_dir(out)} can be resumed: {'; '.join(problems)}. Delete "
                          "the broken ones to start again, or set train.resume=never with "
                          "train.existing=move_aside to keep them aside")
    return None


def _saved_config(out: Path) -> dict[str, Any] | None:
    path = out / "config.yaml"
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text())


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's dict by dotted key (`train.lr`)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _check_same_run(old: dict[str, Any] | None, config: Config,
                    layout: frozenset[str] = frozenset()) -> dict[str, tuple[Any, Any]]:
    """The keys that differ from the saved run's config; refuses run-defining ones not in resume_changes
    (`layout` keys are not run-defining: the trainer checks the global batch they make)."""
    if old is None:
        return {}
    before = flatten(config_from_dict(old).to_dict())  # defaults filled in, as the new config has them
    after = flatten(config.to_dict())
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    accepted = set(config.train.resume_changes)
    fixed = [k for k in changed if k in FIXED]
    refused = [k for k in changed if k not in SAFE_TO_CHANGE | layout and (k not in accepted or k in FIXED)]
    if refused:
        listed = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        fix = f"{', '.join(fixed)} cannot change on resume (the checkpoint's weights decide them); " if fixed else ""
        accept = [k for k in refused if k not in FIXED]
        accept_hint = f", or apply the change with 'train.resume_changes=[{','.join(accept)}]'" if accept else ""
        raise RunDirError(f"train.out_dir={config.train.out_dir} holds a run with a different config: {listed}. "
                          f"{fix}Restore the old values, use another train.out_dir{accept_hint}")
    return changed


def _lock(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
    except OSError as err:
        raise RunDirError(f"train.out_dir={out} is not a writable directory ({err.strerror or err}); choose one "
                          "you can write to") from err
    finally:  # a write that failed (a full disk) may have made the file
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    path = out / LOCK
    here = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, host = _lock_holder(path)
            if holder is not None and host not in (None, here):  # another machine's pid: not ours to check
                raise RunDirError(f"train.out_dir={out} is in use by another run (pid {holder} on {host}, {path}); "
                                  f"wait for it to finish or choose another train.out_dir; if that run is gone (its "
                                  f"machine died), delete {path}") from None
            if holder is not None and holder != os.getpid() and _alive(holder):
                raise RunDirError(f"train.out_dir={out} is in use by another run (pid {holder}, {path}); wait for it "
                                  "to finish or choose another train.out_dir") from None
            log.warning("taking over %s: its run (pid %s) is no longer running", path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {here}\n")
        return
    raise RunDirError(f"could not lock {path}: another run keeps taking it; choose another train.out_dir")


def _lock_holder(path: Path) -> tuple[int | None, str | None]:
    """The pid in a lock and the machine it runs on (None where the lock names none: an earlier mmopd's, this
    machine's)."""
    try:
        pid, *host = path.read_text().split()
        return int(pid), host[0] if host else None
    except (OSError, ValueError):
        return None, None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_room(out: Path, existing: str) -> None:
    """A new run in a used directory: refuse, or move the old contents to a sibling NAME.old-N."""
    if existing == "refuse":
        raise RunDirError(f"train.out_dir={out} already holds a run, and train.resume=never starts a new one; set "
                          "train.existing=move_aside to move the old one aside, train.resume=auto to continue it, "
                          "or choose another train.out_dir")
    n = 1
    while out.with_name(f"{out.name}.old-{n}").exists():
        n += 1
    aside = out.with_name(f"{out.name}.old-{n}")
    aside.mkdir()
    for child in out.iterdir():
        if child.name != LOCK:
            os.replace(child, aside / child.name)
    log.warning("moved the previous run in %s to %s", out, aside)
