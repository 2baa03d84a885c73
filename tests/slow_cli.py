"""``python -m slow_cli ARGS``: the ``uumamba`` CLI with every predicted volume delayed.

For the service's process tests: ``UUMAMBA_TEST_SLOW_S`` seconds of sleep (in steps, so a
cancel between window batches is not needed to stop a killed process) before each
``Predictor.predict_file``, so that a job is still running when the test kills its process.
"""

from __future__ import annotations

import os
import time

from uumamba.inference.predict import Predictor

_original = Predictor.predict_file


def _slow_predict_file(self, *args, **kwargs):
    time.sleep(float(os.environ.get("UUMAMBA_TEST_SLOW_S", "0")))
    return _original(self, *args, **kwargs)


Predictor.predict_file = _slow_predict_file

if __name__ == "__main__":
    from uumamba.cli import main

    main()
