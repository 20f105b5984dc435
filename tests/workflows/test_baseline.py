import json
import random

import pytest

from budgetlm.errors import UserError
from budgetlm.workflows import baseline
from tests.conftest import shared_data

FILLER = "the a movie film story plot was is it this that and of actors scenes".split()


def write_separable(path, n, seed):
    """Sentences of filler words plus one word that gives the class away."""
    rng = random.Random(seed)
    cues = {"pos": ["great", "wonderful", "superb"], "neg": ["awful", "dreadful", "boring"]}
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(FILLER, k=8) + [rng.choice(cues[label])]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_separable_data_with_a_val_file(tmp_path):
    train = write_separable(tmp_path / "train.tsv", 200, 0)
    dev = write_separable(tmp_path / "dev.tsv", 60, 1)
    result = baseline.run(train, dev, out=tmp_path / "out")
    assert result["accuracy"] >= 0.98 and result["macro_f1"] >= 0.98
    assert result["train_examples"] == 200 and result["val_examples"] == 60
    assert result["classes"] == ["neg", "pos"]
    assert json.loads((tmp_path / "out" / "baseline.json").read_text()) == result


def test_val_fraction_splits_the_training_file(tmp_path):
    train = write_separable(tmp_path / "train.tsv", 100, 2)
    result = baseline.run(train, val_fraction=0.2, seed=5)
    assert result["val_examples"] == 20 and result["train_examples"] == 80
    assert result["accuracy"] >= 0.9


def test_noise_labels_score_near_chance(tmp_path):
    """The score measures something: random labels cannot be predicted."""
    rng = random.Random(0)
    lines = ["sentence\tlabel"] + [f"{' '.join(rng.choices(FILLER, k=8))}\t{rng.choice('ab')}" for _ in range(300)]
    (tmp_path / "noise.tsv").write_text("\n".join(lines) + "\n")
    assert baseline.run(tmp_path / "noise.tsv", val_fraction=0.3)["accuracy"] < 0.7


def test_val_label_unseen_in_training(tmp_path):
    train = write_separable(tmp_path / "train.tsv", 20, 0)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngreat\tpos\nso so\tmeh\n")
    with pytest.raises(UserError, match="'meh'.*never occur"):
        baseline.run(train, tmp_path / "dev.tsv")


def test_sst2_reaches_about_082():
    root = shared_data("sst2")
    assert baseline.run(root / "train.tsv", root / "dev.tsv")["accuracy"] > 0.8
