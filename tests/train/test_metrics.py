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
