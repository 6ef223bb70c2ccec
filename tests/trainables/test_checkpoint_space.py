"""A full disk while a checkpoint is written ends the trial with a PermanentTrialError (Tune does not retry it)
that names the folder, the space needed and free, and the fix."""
import shutil
from collections import namedtuple

import pytest
import torch

from datasets.disk_space import is_disk_full
from trainables import fold_training
from trainables.errors import PermanentTrialError

Usage = namedtuple("Usage", "total used free")
STATE = {"model": torch.nn.Linear(256, 256).state_dict(), "epoch": 3, "history": [{"val_loss": 1.0}]}
STATE_BYTES = (256 * 256 + 256) * 4  # 263168 bytes = 257.0 KiB: the tensors being saved


@pytest.fixture
def full_disk(monkeypatch):
    """shutil.disk_usage reports 1000 bytes free, wherever it is asked."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))


def test_a_checkpoint_that_fits_is_written_whole(tmp_path):
    fold_training._save_atomic(STATE, tmp_path / "fold_state.pt")
    loaded = torch.load(tmp_path / "fold_state.pt", weights_only=False)
    torch.testing.assert_close(loaded["model"], STATE["model"], rtol=0, atol=0)
    assert loaded["history"] == STATE["history"] and [p.name for p in tmp_path.iterdir()] == ["fold_state.pt"]
    assert fold_training.tensor_bytes(STATE) == STATE_BYTES


def test_too_little_free_space_stops_before_writing(tmp_path, full_disk):
    with pytest.raises(PermanentTrialError, match=(
            f"^Not enough disk space in {tmp_path}: the checkpoint file fold_state.pt needs 257.0 KiB, 1000 B free\\. "
            f"Free space on that disk, or give checkpoints a larger one \\(TMPDIR for the checkpoints Tune "
            f"collects, --storage for Tune's storage\\)\\.$")):
        fold_training._save_atomic(STATE, tmp_path / "fold_state.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_during_torch_save_gives_the_same_error(tmp_path):
    # The temporary file is /dev/full: the kernel answers every write with ENOSPC, as a full disk does.
    (tmp_path / ".fold_state.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(PermanentTrialError, match=f"^Not enough disk space in {tmp_path}: the checkpoint file "
                                                  f"fold_state.pt needs 257.0 KiB, .* free\\. Free space") as caught:
        fold_training._save_atomic(STATE, tmp_path / "fold_state.pt")
    assert is_disk_full(caught.value.__cause__)
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed, no fold_state.pt appears


def test_the_best_weights_store_reports_a_full_disk_the_same_way(tmp_path, full_disk):
    store = fold_training.WeightStore(tmp_path / "store")
    with pytest.raises(PermanentTrialError, match=f"^Not enough disk space in {tmp_path / 'store'}: the best "
                                                  f"weights of epoch 7 needs 257.0 KiB, 1000 B free"):
        store.save(7, STATE["model"])
    assert not (tmp_path / "store").exists()


def test_a_resumable_checkpoint_counts_model_and_optimizer_and_stops_on_a_full_disk(tmp_path, full_disk):
    # What train_fold writes every checkpoint_every epochs (a trial on the phantoms takes ~20 s here: this is its path).
    model = torch.nn.Linear(256, 256)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()  # Adam's two moments: twice the model again
    state = fold_training._State()
    state.epoch = state.best_epoch = 1
    # Model and Adam's moments, 3 x 257.0 KiB, plus torch's RNG state (5056 bytes) and Adam's step counters.
    with pytest.raises(PermanentTrialError, match=f"^Not enough disk space in {tmp_path}: the checkpoint file "
                                                  f"fold_state.pt needs 775.9 KiB, 1000 B free"):
        fold_training._save_checkpoint(tmp_path, model, optimizer, None, state, fold_training.WeightStore(tmp_path),
                                       torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []
