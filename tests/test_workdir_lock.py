"""One trainer per workdir (parcae_jax/runtime/workdir_lock.py), locally: a second trainer meets the
lock and stops in one line; a killed holder leaves nothing stuck. The gs:// lease is tested
against the emulator in test_gcs.py."""

import json
import logging
import signal
import subprocess
import sys

import pytest

from parcae_jax.runtime.workdir_lock import WorkdirBusy, WorkdirLock
from tests.conftest import ROOT


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_a_released_lock_is_free(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirBusy, match=rf"{tmp_path} is in use by another trainer \(process \d+ on "):
            WorkdirLock(str(tmp_path)).__enter__()
    with WorkdirLock(str(tmp_path)):  # released at exit
        pass


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from parcae_jax.runtime.workdir_lock import WorkdirLock\n"
         f"lock = WorkdirLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusy, match=f"process {holder.pid} on"):
            WorkdirLock(str(tmp_path)).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with WorkdirLock(str(tmp_path)):
        pass


def test_metrics_rows_are_kept_once_per_step_and_a_garbage_middle_line_is_named_and_dropped(tmp_path, caplog):
    """What two trainers on one workdir used to leave (steps 1-5, 1-6, 6) and a damaged middle
    line: a resume keeps one row per step up to the restored step, in order."""
    from parcae_jax.runtime.metrics import MetricsWriter, read_rows

    rows = ([{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
            + [{"step": s, "loss": 10.0 + s} for s in range(1, 7)])
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{garbage")
    lines += ['["not", "a", "row"]', json.dumps({"step": 6, "loss": 99.0}), '{"step": 7, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        MetricsWriter(str(tmp_path), resume_step=5, total_steps=10).close()
    kept = read_rows(str(tmp_path))
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in kept] == [11.0, 12.0, 13.0, 14.0, 15.0]  # the later row of each step
    assert "line 4 is not a metrics row" in caplog.text and "torn last line" in caplog.text
