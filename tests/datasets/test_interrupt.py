"""Ctrl-C during preprocessing: one line that says what is kept, exit status 130, no worker traceback, no worker
left running, no half-written cache entry, and a rerun that goes on from the volumes done."""
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import datasets.preprocessing as preprocess_module
from datasets.__main__ import main as datasets_main
from datasets.preprocessing import IN_PROGRESS_DIRNAME, PreprocessConfig, preprocess
from datasets.records import SubjectRecord
from datasets.workers import Interrupted
from tests.conftest import write_brats_tree, write_ellipsoid

REPO = Path(__file__).resolve().parents[2]
CONFIG = PreprocessConfig(spacing=8.0)

# Runs `python -m datasets prepare` with every volume slowed down and announced by a marker file, in the spawned
# workers too: spawn runs this file again in each worker (as __mp_main__), which patches the worker's module. A
# worker's import of it takes IMPORT_S seconds, as tune_main's imports (torch, Ray) take a few.
DRIVER = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path

    if __name__ == "__mp_main__":
        Path(os.environ["MARKERS"], f"{os.getpid()}-importing").touch()
        time.sleep(float(os.environ["IMPORT_S"]))

    import datasets.preprocessing as preprocessing

    real = preprocessing._resample_and_crop

    def announced_and_slow(paths, config):
        Path(os.environ["MARKERS"], f"{os.getpid()}-{Path(paths[0]).name}").touch()
        time.sleep(1.0)
        return real(paths, config)

    preprocessing._resample_and_crop = announced_and_slow

    if __name__ == "__main__":
        # As in a terminal's foreground job, even where this test runs with SIGINT ignored (a background job).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from datasets.__main__ import main
        sys.exit(main(sys.argv[1:]))
''')


def _alive_in_group(group: int) -> list[str]:
    """Processes of process group ``group`` that are not zombies: "pid command" each."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(text[:text.rindex(")") + 1])
    return alive


def _busy_workers(markers: Path, phase: str) -> int:
    """How many workers have announced ``phase``: "importing" (starting up) or "preprocessing" (inside a volume)."""
    announced = [m.name for m in markers.iterdir() if m.name.endswith("-importing") == (phase == "importing")]
    return len({name.split("-")[0] for name in announced})


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="lists processes through /proc")
@pytest.mark.parametrize("phase", ["importing", "preprocessing"])
def test_ctrl_c_while_workers_start_or_preprocess_ends_with_one_line_exit_130_and_nothing_left_running(
        tmp_path, monkeypatch, phase):
    data, cache, markers = write_brats_tree(tmp_path / "data", per_grade=8), tmp_path / "cache", tmp_path / "markers"
    markers.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MARKERS": str(markers), "PYTHONUNBUFFERED": "1",
           "IMPORT_S": "60" if phase == "importing" else "0"}
    argv = ["prepare", "--data-root", str(data), "--cache-dir", str(cache), "--spacing", "8", "--folds", "2",
            "--workers", "2"]
    # A session of its own: SIGINT goes to its whole process group, driver and workers, as Ctrl-C in a terminal does.
    process = subprocess.Popen([sys.executable, str(driver), *argv], cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180  # spawned workers import torch first: slow on a busy 2-core machine
        while _busy_workers(markers, phase) < 2:
            assert process.poll() is None and time.time() < deadline, process.communicate()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
        drain = time.time() + 30  # multiprocessing's resource tracker ends on its own once the driver is gone
        while _alive_in_group(process.pid) and time.time() < drain:
            time.sleep(0.2)
        left_running = _alive_in_group(process.pid)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for leftover in _alive_in_group(process.pid):
            os.kill(int(leftover.split()[0]), signal.SIGKILL)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    [line] = [line for line in stderr.splitlines() if "interrupted" in line]
    assert re.fullmatch(rf"Preprocessing interrupted(: \d+ of 16 volumes are done and kept in "
                        rf"{re.escape(str(cache / IN_PROGRESS_DIRNAME))}; rerun the same command to preprocess the "
                        rf"other \d+| before the first of 16 volumes was done; rerun the same command to start it "
                        rf"again)\.", line), line
    assert stdout == ""  # no "Cache: ..." line: it stopped there
    assert left_running == []

    # No entry, whole or partial: only the volumes done, each a complete .npy (no temporary file beside them).
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) in (["in-progress"], [])
    kept = sorted((cache / IN_PROGRESS_DIRNAME).iterdir()) if (cache / IN_PROGRESS_DIRNAME).is_dir() else []
    assert all(p.suffix == ".npy" and not p.name.startswith(".") for p in kept), kept
    assert all(np.load(p).dtype == np.float16 for p in kept)
    assert f": {len(kept)} of 16 volumes are done" in line if kept else "before the first" in line

    # The same command again (in this process: one worker is enough) goes on from the volumes kept.
    calls = _interrupt_on_call(monkeypatch, 0)
    assert datasets_main([*argv[:-1], "1"]) == 0
    assert len(calls) == 16 - len(kept)
    assert not (cache / IN_PROGRESS_DIRNAME).exists()


@pytest.fixture
def four(tmp_path):
    return [SubjectRecord(name, "HGG", (str(write_ellipsoid(tmp_path / f"{name}.nii.gz", seed=seed)),), name)
            for seed, name in enumerate("abcd")]


def _interrupt_on_call(monkeypatch, n: int) -> list:
    """_resample_and_crop as usual, but Ctrl-C at its ``n``-th call; the calls' paths are recorded."""
    real, calls = preprocess_module._resample_and_crop, []

    def counted(paths, config):
        calls.append(paths)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(paths, config)

    monkeypatch.setattr(preprocess_module, "_resample_and_crop", counted)
    return calls


def test_an_interrupted_build_says_what_is_kept_and_the_rerun_preprocesses_only_the_rest(tmp_path, four, monkeypatch,
                                                                                        caplog):
    cache = tmp_path / "cache"
    _interrupt_on_call(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="datasets.preprocessing"), pytest.raises(Interrupted) as caught:
        preprocess(four, CONFIG, cache, num_workers=1)
    message = (f"Preprocessing interrupted: 2 of 4 volumes are done and kept in {cache / 'in-progress'}; rerun the "
               f"same command to preprocess the other 2.")
    assert str(caught.value) == message and isinstance(caught.value, KeyboardInterrupt)
    assert caplog.messages == [message]  # logged: shown whatever the caller prints
    assert sorted(p.name for p in cache.iterdir()) == ["in-progress"]  # no entry, whole or partial
    assert len(list((cache / "in-progress").iterdir())) == 2

    calls = _interrupt_on_call(monkeypatch, 0)
    entry = preprocess(four, CONFIG, cache, num_workers=1)
    assert [Path(paths[0]).stem for paths in calls] == ["c.nii", "d.nii"]
    assert sorted(p.name for p in cache.iterdir()) == [entry.directory.name]  # in-progress/ is gone with its volumes
    monkeypatch.undo()
    fresh = preprocess(four, CONFIG, tmp_path / "fresh", num_workers=1)
    assert entry.directory.name == fresh.directory.name
    np.testing.assert_array_equal(entry.volumes(), fresh.volumes())


def test_ctrl_c_before_any_volume_is_done_says_so(tmp_path, four, monkeypatch):
    _interrupt_on_call(monkeypatch, 1)
    with pytest.raises(Interrupted, match="^Preprocessing interrupted before the first of 4 volumes was done; rerun "
                                          "the same command to start it again\\.$"):
        preprocess(four, CONFIG, tmp_path / "cache", num_workers=1)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_a_damaged_kept_volume_is_preprocessed_again(tmp_path, four, monkeypatch):
    cache = tmp_path / "cache"
    _interrupt_on_call(monkeypatch, 3)
    with pytest.raises(Interrupted):
        preprocess(four, CONFIG, cache, num_workers=1)
    first, second = sorted((cache / "in-progress").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    first.write_bytes(first.read_bytes()[:100])  # truncated by something else
    calls = _interrupt_on_call(monkeypatch, 0)
    preprocess(four, CONFIG, cache, num_workers=1)
    assert len(calls) == 3  # the damaged one and the two never done


def test_predictions_volumes_are_not_kept_and_the_message_says_so(tmp_path, four, monkeypatch):
    _interrupt_on_call(monkeypatch, 2)
    with pytest.raises(Interrupted, match="^Preprocessing interrupted after 1 of 4 volumes \\(volumes preprocessed for "
                                          "prediction are not cached\\); rerunning the same command preprocesses them "
                                          "again\\.$"):
        preprocess_module.preprocess_volumes(four, PreprocessConfig(spacing=8.0, target_shape=(16, 16, 16)),
                                             num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.nii.gz" for name in "abcd"]


def test_zero_workers_is_refused_before_any_file_is_read(tmp_path, capsys):
    """`--workers 0` preprocessed serially without --register, and failed inside registration with it."""
    code = datasets_main(["prepare", "--data-root", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c"),
                          "--workers", "0"])
    assert code == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
