"""A benchmark case that fails in its own process (a torchrun'd rank, say) reports the exception that stopped it,
not torchrun's closing rule of `=`."""

from benchmarks.measure import failure_line

TORCHRUN = """[rank1]: Traceback (most recent call last):
[rank1]:   File "benchmarks/step.py", line 118, in child
[rank1]: RuntimeError: Connection reset by peer
E1207 13:55:58 failed (exitcode: 1) local_rank: 1
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
benchmarks.step FAILED
------------------------------------------------------------
============================================================
"""


def test_a_failed_child_reports_its_exception_line_else_its_last_line_else_its_exit_code():
    assert failure_line(TORCHRUN, 1) == "[rank1]: RuntimeError: Connection reset by peer"
    assert failure_line("warming up\nout of patience\n", 3) == "out of patience"
    assert failure_line("", 3) == "exit code 3"
