"""Files that readers never see half-written: write a temporary sibling, then ``os.replace`` it.

The temporary is ``.<name>.<pid>.tmp`` beside the target. A finished write gets the mode every other
file of the run gets (``0o666 & ~umask``) whatever the writer created it with (safetensors' and
``tempfile``'s writers create 0600). A failed write removes its temporary; one a killed process left
(SIGKILL, power loss) is removed by the next write of the same target, once its pid is gone.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gkd.errors import GKDError

__all__ = ["atomic_path", "write_text_atomic", "default_file_mode", "check_writable"]

_log = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask both sets and gets)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # set-and-restore: briefly racy with other threads creating files
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask`` (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.<name>.<pid>.tmp`` siblings of `path` whose writer process no longer exists.

    Only this target's temporaries are considered, never this process's own. A pid is checked on this
    host: gkd writes each handoff/report file from one process, so a writer on another host of a
    shared file system racing on the same target does not occur."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return  # the write itself will report an unusable folder
    for sib in siblings:
        m = pattern.fullmatch(sib.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            size = sib.stat().st_size
            sib.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        except OSError as e:
            _log.warning("cannot remove %s, left by a write that did not finish: %s", sib, e)
            continue
        _log.warning("removed %s (%d bytes), left by an earlier write of %s that did not finish (process %s is "
                     "gone)", sib, size, path.name, m.group(1))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block ends without an error it
    replaces `path` in one step, with mode ``0o666 & ~umask``; otherwise it is removed and `path` is
    left as it was.

    The name is hidden (leading dot) and per process, so globs over the folder and concurrent
    writers on other ranks never pick it up. Temporaries of `path` that dead processes left are
    removed first (and logged)."""
    path = Path(path)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_writable(folder: str | Path, what: str = "the output folder") -> Path:
    """Make sure `folder` can be written, before long work that ends by writing there: a read-only,
    full or unreachable location is an error now. Nothing is left behind: a folder that does not exist
    yet is not created (a temporary folder is made and removed in its nearest existing parent)."""
    folder = Path(folder)
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is a file")
        with tempfile.TemporaryDirectory(dir=base):
            pass
    except OSError as e:
        raise GKDError(f"cannot write to {what} {folder}: {e.strerror or e}; choose another one") from None
    return folder
