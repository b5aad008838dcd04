"""The processes of one run, on one machine or several: they start as one run, and a lost one stops the others.

- `open_shared_run`: rank 0 alone opens the run directory (`rundir.open_run`: the lock, the clean-up, where the run
  starts) and sends its decision to the others. Each other process checks that it was launched with rank 0's config
  and software, and that it sees rank 0's directory: the lock rank 0 just wrote must be there, since every process
  writes its optimizer shards and reads the checkpoint it resumes from in `train.out_dir` (a filesystem that every
  node mounts at the same path). A problem on any rank is raised, the same, on every rank.
- `check_same_records`: after loading, every rank holds the records rank 0 holds (a node's stale copy of a file
  would train other rows without a word).
- `stop_on_lost_peer`: a collective that fails because another process died (its connections reset) or stopped
  answering for `train.collective_timeout` seconds becomes `PeerLost`: one line naming the last complete checkpoint,
  not a traceback from inside the backend.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import socket
from typing import Any, Iterator

import torch
import torch.distributed as dist
import transformers

from mmopd.config import Config, ConfigError
from mmopd.models.checkpoint import complete_checkpoints, load_trainer_state
from mmopd.run.rundir import LOCK, Run, RunDirError, flatten, open_run


class PeerLost(RuntimeError):
    """Another process of the run died or stopped answering; this one stopped. The last checkpoint is intact."""


def _where(rank: int, host: str) -> str:
    return f"rank {rank} (host {host})"


def _software() -> dict[str, str]:
    return {"mmopd": importlib.metadata.version("mmopd"), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _everyone(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (collective)."""
    objects: list[Any] = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def _raise_first(problems: list[BaseException | None]) -> None:
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise first


def open_shared_run(config: Config, accelerator: Any) -> Run:
    """The run every process trains: rank 0 opens it (see `open_run`), the others follow its decision after checking
    that they run rank 0's config and software in rank 0's directory (module doc). Collective."""
    if accelerator.num_processes == 1:
        return open_run(config)
    rank, host = accelerator.process_index, socket.gethostname()
    run, problem = None, None
    if rank == 0:
        try:
            run = open_run(config)
        except Exception as err:  # every rank raises it, so that none waits for the others at a collective
            problem = err
    decision = [{"problem": problem, "host": host, "config": config.to_dict(), "software": _software(),
                 "run": run and {"out": run.out, "run_id": run.run_id, "resume_from": run.resume_from,
                                 "changes": run.changes, "finished": run.finished,
                                 "lock": (run.out / LOCK).read_text()}}]
    dist.broadcast_object_list(decision, src=0)
    told = decision[0]
    _raise_first([told["problem"]])
    problem = None
    if rank > 0:
        try:
            run = _follow(told, config, _where(rank, host))
        except (ConfigError, RunDirError) as err:
            problem = err
    try:
        _raise_first(_everyone(problem, accelerator.num_processes))
    except BaseException:
        if run is not None:
            run.close()
        raise
    return run


def _follow(told: dict[str, Any], config: Config, here: str) -> Run:
    """Rank 0's run as another rank sees it: the same config and software, the same directory (its lock), the
    checkpoint's trainer state read here."""
    zero = _where(0, told["host"])
    theirs, ours = flatten(told["config"]), flatten(config.to_dict())
    differ = [f"{key} {theirs.get(key)!r} on rank 0, {ours.get(key)!r} here" for key in sorted({*theirs, *ours})
              if theirs.get(key) != ours.get(key)]
    differ += [f"{name} {told['software'][name]} on rank 0, {version} here" for name, version in _software().items()
               if told["software"][name] != version]
    if differ:
        raise ConfigError(f"{here} was launched with other settings than {zero}: {'; '.join(differ)}. Launch every "
                          "node with the same config file, overrides and environment")
    decided = told["run"]
    out, lock = decided["out"], decided["out"] / LOCK
    try:
        seen = lock.read_text()
    except OSError:
        seen = None
    if seen != decided["lock"]:
        raise RunDirError(f"{here} does not see the train.out_dir={out} that {zero} opened ({lock} "
                          f"{'is missing' if seen is None else 'holds another run'} here): every process writes "
                          "its checkpoint shards there and resumes from it, so put train.out_dir on a filesystem "
                          "that every node mounts at the same path")
    resume_from = decided["resume_from"]
    return Run(out, decided["run_id"], resume_from, load_trainer_state(resume_from) if resume_from else None,
               decided["changes"], decided["finished"])


def check_same_records(accelerator: Any, digests: dict[str, str]) -> None:
    """Every rank read the records rank 0 read (`digests`: a config key, e.g. data.train, to the digest of its
    records); refused on every rank naming the first rank that differs. Collective."""
    if accelerator.num_processes == 1:
        return
    host = socket.gethostname()
    every = _everyone((host, digests), accelerator.num_processes)
    zero_host, zero = every[0]
    for rank, (other_host, theirs) in enumerate(every[1:], start=1):
        differ = [key for key in zero if theirs.get(key) != zero[key]]
        if differ:
            raise ConfigError(f"{_where(rank, other_host)} reads other records than {_where(0, zero_host)} at "
                              f"{', '.join(differ)} ({', '.join(f'{theirs[k]} != {zero[k]}' for k in differ)}): "
                              "every node must read the same files; copy them again, or put them on a filesystem "
                              "every node mounts")


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed for want of another process (a reset connection, a timeout), as
    torch reports it: a `DistError` (NCCL, the c10d store) or gloo's RuntimeError."""
    return isinstance(err, dist.DistError) or isinstance(err, RuntimeError) and "gloo" in str(err)


def _cause(err: BaseException) -> str:
    """The backend's own words, without its source location and its advice: "Read error [10.0.0.2]:43551: Connection
    reset by peer"."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0].rstrip(".")


@contextlib.contextmanager
def stop_on_lost_peer(accelerator: Any, config: Config) -> Iterator[None]:
    """Inside it, a collective that fails for want of another process raises `PeerLost` (several processes only)."""
    try:
        yield
    except RuntimeError as err:
        if accelerator.num_processes == 1 or isinstance(err, PeerLost) or not lost_peer(err):
            raise
        t = config.train
        saved = complete_checkpoints(t.out_dir)
        kept = (f"The last complete checkpoint, {saved[-1]}, is intact" if saved else
                "No checkpoint was written yet")
        raise PeerLost(f"{_where(accelerator.process_index, socket.gethostname())} of {accelerator.num_processes} "
                       f"lost the run's other processes ({_cause(err)}): one died or did not answer within "
                       f"train.collective_timeout={t.collective_timeout:g} s; its node's log says why. {kept}; "
                       "relaunch every node with the same command to resume from it") from err
