"""The child process of a ProcessSink: `python -m vishwamai.monitoring.sink_process IN_FD OUT_FD`.

Reads pickled (method, args) calls from IN_FD: first ("start", (sink, trainer_view)), then the
sink's log / log_histograms / close calls, in order.  Writes one pickled reply to OUT_FD: the
sink's summary after close, or the error that stopped it.  The parent lowers this process's CPU
priority as it starts it.  Only ever talks to the process that started it (pickle is trusted here).
"""

from __future__ import annotations

import os
import pickle
import sys


def serve(inbox, outbox) -> None:
    try:
        _, (sink, trainer_view) = pickle.load(inbox)
        sink.start(trainer_view)
        while True:
            try:
                method, args = pickle.load(inbox)
            except EOFError:  # the training process went away without closing
                return
            getattr(sink, method)(*args)
            if method == "close":
                pickle.dump(("summary", sink.summary()), outbox)
                return
    except BaseException as error:  # noqa: BLE001 - reported to the training process
        pickle.dump(("error", f"{type(error).__name__}: {error}"), outbox)


def main(argv: list[str]) -> None:
    with os.fdopen(int(argv[0]), "rb") as inbox, os.fdopen(int(argv[1]), "wb") as outbox:
        serve(inbox, outbox)


if __name__ == "__main__":
    main(sys.argv[1:])
