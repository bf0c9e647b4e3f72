"""User errors and the one boundary every `gkd` command and `stages/stageN.py` runs inside.

A user error is a mistake the user can fix: a config value, a file, the data, the environment (a
read-only or full disk). The boundary prints it as one ``gkd: error: …`` line and exits 2; anything
else is an internal error and keeps its traceback. ``GKD_DEBUG=1`` keeps the traceback of both.

Under ``accelerate launch`` every rank that fails runs the boundary; a message several local ranks
hit at once (the same bad file) is printed by the first of them only, and it is written to the
launcher's error file, so its failure summary shows the message instead of a bare exit code.
Bottom layer: no torch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

__all__ = ["GKDError", "HandoffError", "is_user_error", "error_boundary", "report_user_error"]


class GKDError(Exception):
    """A mistake the user can fix; the message names the key or file and says what to do."""


class HandoffError(GKDError, ValueError):
    """A handoff file that cannot be read: truncated, not safetensors, or its contents changed."""


# What the loaders raise for a bad option, file or dataset (their messages name the key or path).
_USER_TYPES = (GKDError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def is_user_error(e: BaseException) -> bool:
    """True for the errors a user causes or can mend (see the module docstring)."""
    if isinstance(e, _USER_TYPES):
        return True
    return isinstance(e, OSError) and e.errno in _DISK_ERRNOS


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) quotes its message
    if isinstance(e, OSError) and not isinstance(e, _USER_TYPES) and e.filename:
        return f"{e.strerror}: {e.filename} (free space or use another out_dir)"
    return str(e) or type(e).__name__


def _first_local_reporter(message: str) -> bool:
    """Among the local ranks of one launch, only the first to report `message` prints it."""
    if "LOCAL_RANK" not in os.environ:
        return True
    key = hashlib.sha1(f"{os.getppid()}:{os.environ.get('MASTER_PORT', '')}:{message}".encode()).hexdigest()[:16]
    try:
        os.close(os.open(Path(tempfile.gettempdir()) / f"gkd-error-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True


def report_user_error(e: BaseException, prog: str = "gkd") -> None:
    """Print `e` as one line on stderr (once per launch) and record it for torchrun's summary."""
    message = _message(e)
    line = f"{prog}: error: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass
    if _first_local_reporter(message):
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"{line}{where}", file=sys.stderr, flush=True)


def error_boundary(fn: Callable[[], int | None], prog: str = "gkd") -> int:
    """Run `fn`; a user error becomes one message and exit status 2, anything else propagates."""
    try:
        return fn() or 0
    except Exception as e:
        if not is_user_error(e) or os.environ.get("GKD_DEBUG"):
            raise
        report_user_error(e, prog)
        return 2
