"""What a drm-taskiq process does when it must stop for good (bad settings, Redis gone)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys


def stop_taskiq_supervisor() -> None:
    """In a ``taskiq worker`` child, stop the supervising parent too.

    taskiq's process manager restarts a dead child forever; for failures that a restart does not
    heal (invalid settings, Redis unreachable past its limit) the whole command must stop. The
    parent is ended with SIGUSR1, so the command exits non-zero (138).
    """
    in_child = multiprocessing.parent_process() is not None
    # taskiq's CLI strips its own name from sys.argv: a worker child sees ["worker", ...].
    if in_child and sys.argv[:1] == ["worker"]:
        os.kill(os.getppid(), signal.SIGUSR1)
