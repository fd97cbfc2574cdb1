"""Process helpers shared by the checkpoint writer and the data set writer."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine): a temporary file tagged with a live
    writer's PID is that writer's, and cleanup must leave it alone."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
