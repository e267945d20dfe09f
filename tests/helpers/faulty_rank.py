"""The gigadiff CLI, for torchrun in tests, with one rank made to fail after some model calls.

GIGADIFF_TEST_FAULT=kill|hang, GIGADIFF_TEST_FAULT_RANK=r, GIGADIFF_TEST_FAULT_AFTER=n: rank r is killed with
SIGKILL (or hangs) when it is about to make its (n+1)-th model call. The fault lives here, not in gigadiff.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from gigadiff.backends.unet import UNetBackend
from gigadiff.cli import main

MODE = os.environ["GIGADIFF_TEST_FAULT"]
TARGET = int(os.environ["GIGADIFF_TEST_FAULT_RANK"])
AFTER = int(os.environ["GIGADIFF_TEST_FAULT_AFTER"])
_predict = UNetBackend.predict
_calls = [0]


def faulty_predict(self, *args, **kwargs):
    _calls[0] += 1
    if int(os.environ["RANK"]) == TARGET and _calls[0] > AFTER:
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return _predict(self, *args, **kwargs)


UNetBackend.predict = faulty_predict
if __name__ == "__main__":
    sys.argv = ["gigadiff", *sys.argv[1:]]
    main()
