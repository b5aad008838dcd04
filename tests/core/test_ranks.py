"""The processes of one run agree before training (rank 0's config, software and directory), and a collective that
fails for want of a peer stops the run in one line (2-process runs of all of it: tests/e2e/test_sharding.py)."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmopd.config import ConfigError, load_config
from mmopd.run import ranks
from mmopd.run.rundir import LOCK, RunDirError

REQUIRED = {"student.path": "s", "teacher.path": "t", "data.train": "d.jsonl"}
TWO = SimpleNamespace(num_processes=2, process_index=1)
# gloo's own words when a peer's process died (its connections reset) and when one froze (train.collective_timeout)
RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:34493: "
         "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application. "
         "Check the logs of the remote worker before reporting an error. GLHF!")
FROZEN = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms "
          "for recv operation to complete")


def _told(config, lock: str, **run) -> dict:
    """What rank 0 broadcasts: its host, config, software and run."""
    return {"problem": None, "host": "node-a", "config": config.to_dict(), "software": ranks._software(),
            "run": {"out": Path(config.train.out_dir), "run_id": "r0", "resume_from": None, "changes": {},
                    "finished": None, "lock": lock, **run}}


def test_another_rank_follows_rank_0s_run_when_it_sees_its_lock(tmp_path):
    config = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path)})
    (tmp_path / LOCK).write_text("4242 node-a\n")
    run = ranks._follow(_told(config, "4242 node-a\n"), config, "rank 1 (host node-b)")
    assert (run.out, run.run_id, run.resume_from, run.locked) == (tmp_path, "r0", None, False)


def test_a_rank_launched_with_other_settings_is_refused_naming_each(tmp_path):
    zero = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path)})
    here = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path), "train.lr": 1e-3})
    told = _told(zero, "4242 node-a\n")
    told["software"] = {**told["software"], "torch": "2.0.0"}
    with pytest.raises(ConfigError, match=r"rank 1 \(host node-b\) was launched with other settings than rank 0 \(host "
                                          r"node-a\): train.lr 0.0001 on rank 0, 0.001 here; torch 2.0.0 on rank 0, "
                                          r".* here. Launch every node with the same config file"):
        ranks._follow(told, here, "rank 1 (host node-b)")


@pytest.mark.parametrize("lock, seen", [(None, "is missing"), ("77 node-c\n", "holds another run")])
def test_a_rank_that_does_not_see_rank_0s_directory_is_refused(tmp_path, lock, seen):
    """Every rank writes its optimizer shards into train.out_dir and resumes from it: a node-local directory would
    leave checkpoints without their shards."""
    config = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path)})
    if lock:
        (tmp_path / LOCK).write_text(lock)
    with pytest.raises(RunDirError, match=rf"rank 1 \(host node-b\) does not see the train.out_dir={tmp_path} that "
                                          rf"rank 0 \(host node-a\) opened \(.*{seen} here\).*a filesystem that every "
                                          "node mounts at the same path"):
        ranks._follow(_told(config, "4242 node-a\n"), config, "rank 1 (host node-b)")


def test_ranks_that_read_other_training_records_are_refused(monkeypatch):
    every = [("node-a", {"data.train": "n16-abc"}), ("node-b", {"data.train": "n16-abc"}),
             ("node-c", {"data.train": "n15-def"})]
    monkeypatch.setattr(ranks, "_everyone", lambda obj, world: every)
    with pytest.raises(ConfigError, match=r"rank 2 \(host node-c\) reads other records than rank 0 \(host node-a\) at "
                                          r"data.train \(n15-def != n16-abc\): every node must read the same files"):
        ranks.check_same_records(SimpleNamespace(num_processes=3), {"data.train": "n16-abc"})


@pytest.mark.parametrize("words, cause", [(RESET, "Read error [10.0.0.2]:34493: Connection reset by peer"),
                                          (FROZEN, "Timed out waiting 15000ms for recv operation to complete")])
def test_a_collective_that_lost_its_peer_stops_in_one_line_naming_the_last_checkpoint(tmp_path, words, cause):
    config = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path), "train.collective_timeout": 15})
    (tmp_path / "checkpoints/step-4").mkdir(parents=True)
    (tmp_path / "checkpoints/step-4/COMPLETE").write_text("4 r0")
    with pytest.raises(ranks.PeerLost) as stopped, ranks.stop_on_lost_peer(TWO, config):
        raise RuntimeError(words)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith(f"rank 1 (host {socket.gethostname()}) of 2 lost the run's other processes "
                              f"({cause}): one died or did not answer within train.collective_timeout=15 s")
    assert message.endswith(f"The last complete checkpoint, {tmp_path / 'checkpoints/step-4'}, is intact; relaunch "
                            "every node with the same command to resume from it")


def test_other_errors_and_one_process_runs_keep_their_own_error(tmp_path):
    config = load_config(None, {**REQUIRED, "train.out_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="^shapes do not match$"), ranks.stop_on_lost_peer(TWO, config):
        raise RuntimeError("shapes do not match")  # a bug stays a traceback
    alone = SimpleNamespace(num_processes=1, process_index=0)
    with pytest.raises(RuntimeError, match="Connection reset"), ranks.stop_on_lost_peer(alone, config):
        raise RuntimeError(RESET)
