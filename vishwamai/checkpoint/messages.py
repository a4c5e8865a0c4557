"""What a user is told when a checkpoint cannot be read or written.

torch's weights_only error advises "Re-running torch.load with weights_only set to False
will likely succeed": here that is advice to run a possibly hostile file's code, so it is
never relayed.  Disk-full errors come wrapped in several library types (OSError, torch's
"file write failed", safetensors' IoError); they all read "no space left on device".
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

NO_SPACE = "no space left on device"
# Lines of torch's weights_only message that are advice, not the reason.
_ADVICE = ("weights only load failed", "weights_only", "re-running", "trusted source", "check the documentation",
           "arbitrary code")


def load_failure(error: BaseException) -> str:
    """The reason a file could not be loaded, without torch's unsafe advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not any(a in line.lower() for a in _ADVICE)]
    if reasons:
        return reasons[0]
    return "it holds objects other than plain data" if lines else type(error).__name__


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException, path: Path | None = None) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e).lower()
        if "no space left" in text or "storagefull" in text or "os error 28" in text:
            return True
    if path is not None:  # torch.save says only "file write failed": look at the file system itself
        try:
            return shutil.disk_usage(_existing(path)).free < (1 << 20)
        except OSError:
            return False
    return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failure(error: BaseException, path: Path) -> str:
    """Why writing under `path` failed, in words (disk full named as such)."""
    if is_disk_full(error, path):
        return NO_SPACE
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {load_failure(error)}"
