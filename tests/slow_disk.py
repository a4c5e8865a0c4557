"""The training CLI on a slow disk: every checkpoint pauses between writing its files and publishing them.

    python tests/slow_disk.py SECONDS [key=value ...]

For the crash tests: a kill (or a full disk) lands inside a save.  The pause is injected here, in the
test's own process, so the checkpoint code carries no test-only setting.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vishwamai

import vishwamai.checkpoint.manager as manager  # noqa: E402
from vishwamai.training_v2 import main  # noqa: E402


def _slow(write_manifest, seconds: float):
    def slow_write_manifest(*args, **kwargs):
        time.sleep(seconds)  # the files are written; the manifest and the publication wait
        return write_manifest(*args, **kwargs)

    return slow_write_manifest


if __name__ == "__main__":
    manager.write_manifest = _slow(manager.write_manifest, float(sys.argv.pop(1)))
    main()
