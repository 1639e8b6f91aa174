"""A DDP rank that Lightning's launcher started ends with the process that started it.

Lightning starts ranks 1..N-1 with ``subprocess.Popen`` from rank 0 (``LOCAL_RANK`` set in theirs), and
nothing ends them when rank 0 dies: a rank still connecting to the process group retries for half an
hour, holding its memory. On Linux the kernel can send a signal to a process when its parent ends
(``PR_SET_PDEATHSIG``); a rank asks for SIGKILL there, as soon as it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

LAUNCHER_PID = "QLIGHT_LAUNCHER_PID"  # rank 0's pid, inherited by the ranks it starts
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def end_with_launcher() -> None:
    """In a started rank (``LOCAL_RANK`` other than 0), on Linux: be killed when the parent ends, and exit
    now if it already has. Elsewhere, record this process's pid for the ranks it may start."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        os.environ[LAUNCHER_PID] = str(os.getpid())
        return
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the rank runs as before
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is not None and launcher != str(os.getppid()):  # it ended before the signal was asked for
        print(f"error: rank 0 (pid {launcher}), which started this rank, has ended", file=sys.stderr)
        sys.exit(1)
