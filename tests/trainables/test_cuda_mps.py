"""The private MPS daemon's life cycle, with a stand-in control program (this machine has no NVIDIA driver).

The stand-in records how it was called, so the tests check what this module asks of the real
``nvidia-cuda-mps-control``: ``-d`` in private pipe/log folders, then ``quit`` on stdin with the same folders.
"""
from __future__ import annotations

import argparse
import os
import stat

import pytest
import torch

from trainables import benchmark
from trainables.cuda_mps import CONTROL, MpsUnavailable, log_tail, private_mps

STAND_IN = """#!/bin/sh
# Records each call: arguments, the MPS folders, and stdin when called without arguments.
if [ "$1" = "-d" ]; then
    echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$MPS_RECORD"
    [ -n "$MPS_FAIL" ] && { echo "$MPS_FAIL" >&2; exit 1; }
    echo "[daemon] started" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
    exit 0
fi
read command
echo "$command $CUDA_MPS_PIPE_DIRECTORY" >> "$MPS_RECORD"
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    program = folder / CONTROL
    program.write_text(STAND_IN)
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.txt"
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MPS_RECORD", str(record))
    monkeypatch.delenv("MPS_FAIL", raising=False)
    return record


def test_missing_control_program_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailable, match=f"{CONTROL} is not on PATH.*--mps off"):
        with private_mps():
            pass


def test_daemon_runs_in_private_folders_and_quits_even_after_an_error(stand_in):
    with pytest.raises(ZeroDivisionError):
        with private_mps() as env:
            pipe, logs = env["CUDA_MPS_PIPE_DIRECTORY"], env["CUDA_MPS_LOG_DIRECTORY"]
            assert os.path.isdir(pipe) and os.path.isdir(logs) and pipe != "/tmp/nvidia-mps"
            assert log_tail(env) == "control.log: [daemon] started"
            1 / 0
    assert stand_in.read_text().splitlines() == [f"start {pipe} {logs}", f"quit {pipe}"]
    assert not os.path.exists(pipe)  # the private folders are gone with the daemon


def test_a_daemon_that_will_not_start_says_why(stand_in, monkeypatch):
    monkeypatch.setenv("MPS_FAIL", "permission denied on /dev/nvidia0")
    with pytest.raises(MpsUnavailable, match=r"-d failed: permission denied on /dev/nvidia0"):
        with private_mps():
            pass
    assert len(stand_in.read_text().splitlines()) == 1  # nothing to quit


def test_log_tail_without_logs():
    assert log_tail({"CUDA_MPS_LOG_DIRECTORY": "/nonexistent"}) == "no MPS log written"


def test_concurrent_rows_keep_the_plain_rows_when_mps_cannot_start(stand_in, monkeypatch):
    # The benchmark runs this on CUDA only; the policy is the same on a CPU: MPS rows are dropped with a reason.
    monkeypatch.setenv("MPS_FAIL", "no GPU here")
    row = {"model": "mc3_18", "precision": "float32", "flops_per_step": 1e9, "peak_tflops": None,
           "memory_format": "channels_last_3d", "compiled": False}
    args = argparse.Namespace(batch_size=1, warmup=0, steps=1)
    rows, notes = benchmark._concurrent_rows([row], [2], args, (8, 8, 8), 1, torch.device("cpu"), [False, True])
    assert [(r["trials_per_device"], r["mps"]) for r in rows] == [(2, False)]
    assert rows[0]["samples_per_s"] > 0 and rows[0]["peak_fraction"] is None
    assert rows[0]["memory_format"] == "channels_last_3d"  # the processes ran the row's own variant
    assert notes == [f"CUDA MPS: not measured: {CONTROL} -d failed: no GPU here (a container may need the host's "
                     f"IPC namespace, or the GPU's compute mode forbids it)"]


def test_a_trial_process_failing_under_mps_is_reported_with_the_daemon_log(stand_in):
    # A worker that cannot build its model exits before "ready", as a client refused by the MPS server would.
    row = {"model": "no_such_model", "precision": "float32", "flops_per_step": 1e9, "peak_tflops": None,
           "memory_format": "contiguous", "compiled": False}
    args = argparse.Namespace(batch_size=1, warmup=0, steps=1)
    rows, notes = benchmark._concurrent_rows([row], [2], args, (8, 8, 8), 1, torch.device("cpu"), [True])
    assert rows == [] and len(notes) == 1
    assert notes[0].startswith("CUDA MPS: the daemon started but a trial process failed under it "
                               "(a --concurrency worker failed (exit 1))")
    assert notes[0].endswith("; control.log: [daemon] started")
    assert stand_in.read_text().splitlines()[-1].startswith("quit ")  # and the daemon was stopped
    # Without MPS the same failure (as a GPU in EXCLUSIVE_PROCESS mode gives the second process) costs its rows
    # too, and says which compute mode to look for; the in-process rows measured before are kept by the caller.
    rows, notes = benchmark._concurrent_rows([row], [2], args, (8, 8, 8), 1, torch.device("cpu"), [False])
    assert rows == [] and notes == [
        "concurrent trial processes: not measured: a --concurrency worker failed (exit 1); if the GPU's compute "
        "mode is EXCLUSIVE_PROCESS (`nvidia-smi --query-gpu=compute_mode --format=csv`), only one process may use "
        "it at a time"]


def test_a_daemon_that_hangs_at_start_is_unavailable_not_a_crash(stand_in, tmp_path):
    program = tmp_path / "bin" / CONTROL
    program.write_text("#!/bin/sh\nexec sleep 30\n")  # exec: no grandchild holding the pipe
    with pytest.raises(MpsUnavailable, match=rf"{CONTROL} -d did not return within 0.5 s; no MPS log written"):
        with private_mps(timeout_s=0.5):
            pass
