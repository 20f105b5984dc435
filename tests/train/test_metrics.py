from budgetlm.train.metrics import RunLog


def test_an_evaluation_line_repeats_the_last_training_loss(capsys):
    log = RunLog(None)
    log.show(0.1, loss=0.693, val=None, rate=100.0, left_s=50.0, force=True)
    log.show(0.2, loss=None, val="val acc 0.550", rate=120.0, left_s=40.0, force=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("[ 20.0%]")
    assert "loss 0.693" in lines[-1] and "val acc 0.550" in lines[-1]


def test_no_loss_is_shown_before_the_first_step(capsys):
    RunLog(None).show(0.0, loss=None, val="val acc 0.467", rate=0.0, left_s=60.0, force=True)
    assert "loss" not in capsys.readouterr().err


def test_the_loss_plot_draws_the_final_evaluation_as_a_labelled_point(tmp_path, monkeypatch):
    from budgetlm.train.metrics import plot_losses
    from tests.conftest import SavedFigures

    figures = SavedFigures(monkeypatch)
    records = [{"kind": "train", "step": 1, "tokens": 100, "elapsed_s": 1.0, "train_loss": 4.0},
               {"kind": "eval", "step": 1, "tokens": 100, "elapsed_s": 1.5, "val_loss": 3.9, "val_bpb": 2.4,
                "val_sample_tokens": 2048, "val_full": False, "val_bpb_se": 0.01},
               {"kind": "eval", "step": 9, "tokens": 900, "elapsed_s": 9.5, "val_loss": 3.1, "val_bpb": 2.0,
                "val_sample_tokens": 2048, "val_full": False, "val_bpb_se": 0.01},
               {"kind": "final", "step": 9, "tokens": 900, "elapsed_s": 10.0, "best_step": 9, "val_loss": 3.05,
                "val_bpb": 1.98771, "val_full": True}]
    plot_losses(records, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    sample = figures.labelled("fixed sample of 2,048 tokens")
    assert sample and sample[0][2] == [3.9, 3.1]  # the final evaluation is not part of the curve
    final = figures.labelled("final, whole validation set", "1.9877 bits/byte")
    assert len(final) == 2 and all(x == [rec] and y == [3.05] for (_, x, y), rec in zip(final, (900, 10.0)))
