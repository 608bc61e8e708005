"""`driftd retrain --local`: the progress bar shows the epoch that just finished, not the next."""

from __future__ import annotations

from monitor.cli.retrain import progress_line
from retrain.progress import EVENTS


def test_epoch_one_of_ten_is_printed_as_one_of_ten() -> None:
    budget = {"head": 10, "finetune": 8}
    line = progress_line({"event": "epoch", "phase": "head", "epoch": 1, "train_loss": 0.5, "val_loss": 0.4,
                          "grad_norm": 1.0, "weight_drift": 0.0}, budget)
    assert "epoch 1/10" in line and "[##" in line and "val_loss=0.4" in line
    last = progress_line({"event": "epoch", "phase": "finetune", "epoch": 8, "train_loss": 0.1, "val_loss": 0.2,
                          "grad_norm": 3.0, "weight_drift": 0.5}, budget)
    assert "epoch 8/8" in last and "[" + "#" * 20 + "]" in last


def test_step_events_move_the_bar_within_an_epoch_and_guards_get_a_line() -> None:
    assert "step" in EVENTS
    budget = {"head": 10, "finetune": 8}
    line = progress_line({"event": "step", "phase": "finetune", "epoch": 2, "step": 50, "train_loss": 0.3,
                          "grad_norm": 2.5, "weight_drift": 0.1}, budget)
    assert "epoch 2/8" in line and "step 50" in line and "grad_norm=2.5" in line
    guard = progress_line({"event": "guard", "phase": "finetune", "message": "validation loss rose"}, budget)
    assert guard == "\n[retrain] guard: validation loss rose"
    assert progress_line({"event": "step", "phase": "lr_range_test"}, budget) is None
