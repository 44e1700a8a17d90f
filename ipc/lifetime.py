"""A child process's life tied to its parent's: Linux ``PR_SET_PDEATHSIG``.

The kernel sends the child a signal when the *thread* that forked it exits
(a supervisor killed with SIGKILL included), so nothing the engine or a tool
started is left running after it. libc's ``prctl`` is resolved here, at
import, so a forked child only makes the one call: safe in a ``preexec_fn``,
where loading a library could deadlock on a lock another thread held at the
fork. Where there is no ``prctl`` (not Linux) the call does nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_prctl: Callable[..., int] | None = None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    pass


def signal_on_parent_death(sig: int, parent: int | None = None) -> None:
    """Have the kernel send this process ``sig`` when its parent dies.

    With ``parent`` (the pid the caller expects as its parent), a parent that
    died before the call took effect is caught too: the process sends itself
    ``sig`` at once. Without it the call is one ``prctl``, for a
    ``preexec_fn``."""
    if _prctl is None:  # pragma: no cover - not Linux
        return
    _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
