"""Stand-in for `python -m parcae_jax.main` in tests/test_launcher.py (copied into a throw-away
repository as parcae_jax/main.py): prints how it was started as one JSON line, then "trains"
until SIGTERM, on which it says it saved a checkpoint and exits 0, as the real trainer does."""

import json
import os
import signal
import sys
import time

KEYS = ("TPU_WORKER_ID", "SLURM_PROCID", "XLA_FLAGS", "NCCL_DEBUG", "XLA_PYTHON_CLIENT_MEM_FRACTION", "STUB_NOTE")


def on_sigterm(_signum, _frame):
    print("SIGTERM: checkpoint saved", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, on_sigterm)
print("STARTED " + json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
                               "env": {k: os.environ.get(k) for k in KEYS}}), flush=True)
time.sleep(float(os.environ.get("STUB_SECONDS", "300")))
print("finished without a signal", flush=True)
