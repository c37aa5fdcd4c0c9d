"""A testing aid: kill the trainer with SIGKILL at a named point (``tests/test_fault_injection.py``).

    QSTAR_FAULT_INJECT=save:3 python -m qstar.train ...   # SIGKILL the 3rd time the loop saves

``QSTAR_FAULT_INJECT`` is ``<point>:<n>``: the process sends itself SIGKILL the ``n``-th time (from 1)
it reaches :func:`fault_point` with that name. Unset (always, outside the tests), every call returns
at once. The points:

* ``save``: the loop is about to save a checkpoint (the step's metrics row is written);
* ``log-append``: a ``metrics.csv`` row is written, the step's ``thoughts.txt`` record is not yet;
* ``log-rewrite``: a log cut back on resume is written to its temporary file, not yet renamed;
* ``checkpoint-write``: a checkpoint's temporary directory is complete, not yet renamed into place;
* ``checkpoint-delete``: an old checkpoint of the same step is being deleted (a rollback resume).
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "fault_point"]

ENV = "QSTAR_FAULT_INJECT"
_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process if ``QSTAR_FAULT_INJECT`` is ``<name>:<n>`` and this is the n-th call."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, n = spec.rpartition(":")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
