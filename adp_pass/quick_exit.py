"""Leave a process that has loaded torch without the interpreter's teardown.

Tearing down torch, dynamo and Triton at exit takes most of a second (0.8 s on a 2-core CPU),
after the work is done and printed: ``adp run`` and each of its ranks end with it, in series.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_without_teardown(code: int) -> None:
    """End the process with ``code`` now if torch is loaded (else return): the atexit functions
    run and stdout/stderr are flushed first. While another thread runs, return too: the
    ordinary exit waits for it."""
    if "torch" not in sys.modules or threading.active_count() > 1:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the ordinary exit would not print either
            pass
    os._exit(code)
