"""SIGINT/SIGTERM: the first asks the loop to finish its step, save and stop; a second exits at once."""

from __future__ import annotations

import os
import signal
import sys


class GracefulStop:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            print("\nsecond signal: exiting now", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving and stopping "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
