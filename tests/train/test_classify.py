import numpy as np
import pytest
import torch
import torch.nn.functional as F

from budgetlm.errors import UserError
from budgetlm.models.classifier import Classifier, ClassifierConfig
from budgetlm.models.config import ModelConfig
from budgetlm.train.classify import (
    ClassificationTask,
    LengthBucketSampler,
    collate,
    layer_scaled,
    predict_probs,
)
from budgetlm.train.optim import build_optimizer

CPU = torch.device("cpu")


def random_lengths(n=1000, seed=0):
    return np.random.default_rng(seed).integers(2, 60, n)


def tiny_model(n_classes=2):
    torch.manual_seed(0)
    body = ModelConfig(vocab_size=32, context=64, n_layer=2, n_head=2, d_model=16).to_dict()
    return Classifier(ClassifierConfig(body="gpt", body_config=body, labels=[str(i) for i in range(n_classes)]))


def seqs_and_labels(n=40, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, 32, rng.integers(1, 20)) for _ in range(n)]
    return seqs, rng.integers(0, 2, n).tolist()


def test_collate_pads_to_the_longest_row():
    ids, mask = collate([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_each_epoch_visits_every_example_at_most_once_in_full_batches():
    lengths = random_lengths(1000)
    sampler = LengthBucketSampler(lengths, batch=32)
    assert sampler.per_epoch == 31  # 1000 // 32: the 8 left over wait for another epoch
    left_out = []
    for epoch in range(2):
        batches = [sampler.batch_at(epoch * sampler.per_epoch + k) for k in range(sampler.per_epoch)]
        assert all(len(b) == 32 for b in batches)
        rows = np.concatenate(batches)
        assert len(set(rows.tolist())) == len(rows) == 992
        left_out.append(set(range(1000)) - set(rows.tolist()))
    assert left_out[0] != left_out[1]


def test_a_dataset_smaller_than_a_batch_is_one_batch():
    sampler = LengthBucketSampler(np.array([3, 1, 2]), batch=32)
    assert sorted(sampler.batch_at(0).tolist()) == sorted(sampler.batch_at(5).tolist()) == [0, 1, 2]


def test_batches_are_a_pure_function_of_seed_and_index():
    lengths = random_lengths(500)
    walked = LengthBucketSampler(lengths, batch=16, seed=3)
    expected = [walked.batch_at(i).tolist() for i in range(3 * walked.per_epoch)]
    fresh = LengthBucketSampler(lengths, batch=16, seed=3)
    for i in (70, 5, 2 * fresh.per_epoch + 1, 0):  # any order, as after a resume
        assert fresh.batch_at(i).tolist() == expected[i]
    other = LengthBucketSampler(lengths, batch=16, seed=4)
    assert [other.batch_at(i).tolist() for i in range(5)] != expected[:5]


def test_bucketing_pads_far_less_than_random_batches():
    lengths = random_lengths(3200)
    sampler = LengthBucketSampler(lengths, batch=32)
    batches = [sampler.batch_at(k) for k in range(sampler.per_epoch)]
    padded = sum(lengths[b].max() * len(b) for b in batches)
    random_order = np.random.default_rng(0).permutation(3200)
    padded_random = sum(lengths[random_order[i:i + 32]].max() * 32 for i in range(0, 3200, 32))
    assert padded / lengths.sum() < 1.1 < padded_random / lengths.sum()


def test_task_batches_losses_and_evaluation():
    seqs, labels = seqs_and_labels()
    task = ClassificationTask(seqs, labels, seqs, labels, micro_batch=8, micro_steps=2, seed=0)
    model = tiny_model().eval()  # no dropout: the two losses must match
    ids, mask, y = task.batch(step=1, micro=1)
    assert ids.shape[0] == 8 and task.count((ids, mask, y)) == 8
    assert torch.equal(mask.sum(1), torch.tensor([len(seqs[i]) for i in task.sampler.batch_at(3)]))
    loss = task.loss(model, (ids, mask, y))
    torch.testing.assert_close(loss, F.cross_entropy(model(ids, mask), y, reduction="sum"))
    with torch.no_grad():
        metrics = task.evaluate(model, None)
        first = task.evaluate(model, 1)
    assert set(metrics) >= {"val_loss", "val_accuracy", "val_macro_f1"}
    assert metrics["val_examples"] == 40 and first["val_examples"] <= 64
    truth = np.argmax(predict_probs(model, seqs, 16, CPU), 1)
    assert metrics["val_accuracy"] == pytest.approx(np.mean(truth == np.array(labels)))


@pytest.mark.parametrize("ensemble", [False, True])
def test_an_evaluation_reads_the_device_a_fixed_number_of_times(ensemble, monkeypatch):
    from tests.conftest import HostReads

    seqs, labels = seqs_and_labels()
    model = tiny_model().eval()
    prior = (np.full((40, 2), 0.5, dtype=np.float32), 1) if ensemble else None
    reads = []
    for eval_batch in (40, 4):  # one batch, then ten
        task = ClassificationTask(seqs, labels, seqs, labels, micro_batch=8, eval_batch=eval_batch, prior=prior)
        assert len(task.eval_batches) == 40 // eval_batch
        with pytest.MonkeyPatch.context() as patch, torch.no_grad():
            counter = HostReads(patch)
            metrics = task.evaluate(model, None)
        reads.append(counter.count)
        assert metrics["val_examples"] == 40
    assert reads[0] == reads[1]


def test_a_later_ensemble_member_is_evaluated_as_part_of_the_ensemble():
    seqs, labels = seqs_and_labels()
    model = tiny_model().eval()
    own = predict_probs(model, seqs, 16, CPU)
    # an earlier member sure of the truth outweighs this one wherever they disagree
    y = np.array(labels)
    earlier = np.zeros_like(own)
    earlier[np.arange(40), y] = 1.0
    task = ClassificationTask(seqs, labels, seqs, labels, micro_batch=8, seed=0, prior=(earlier, 1))
    with torch.no_grad():
        metrics = task.evaluate(model, None)
    mixed = (earlier + own) / 2
    assert metrics["val_accuracy"] == 1.0
    assert metrics["val_member_accuracy"] == pytest.approx(np.mean(own.argmax(1) == y))
    expected_loss = -np.mean(np.log(np.maximum(mixed[np.arange(40), y], 1e-30)))
    assert metrics["val_loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_predictions_come_back_in_input_order():
    seqs, _ = seqs_and_labels(30)
    model = tiny_model(3).eval()
    probs = predict_probs(model, seqs, batch=7, device=CPU)
    with torch.no_grad():
        one_by_one = [torch.softmax(model(torch.from_numpy(s)[None], torch.ones(1, len(s), dtype=torch.int64)), -1)[0]
                      for s in seqs]
    np.testing.assert_allclose(probs, torch.stack(one_by_one).numpy(), atol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_frozen_body_gets_no_gradient_until_freeze_steps():
    seqs, labels = seqs_and_labels()
    model = tiny_model()
    task = ClassificationTask(seqs, labels, seqs, labels, micro_batch=8, body=model.body, freeze_steps=2)
    for step, frozen in ((0, True), (1, True), (2, False)):
        batch = task.batch(step, 0)
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).backward()
        assert (model.body.gpt.embed.weight.grad is None) == frozen
        assert model.head.out.weight.grad is not None


def test_an_embedding_frozen_for_the_run_stays_frozen_when_the_body_thaws():
    seqs, labels = seqs_and_labels()
    model = tiny_model()
    model.body.token_embedding().requires_grad_(False)
    task = ClassificationTask(seqs, labels, seqs, labels, micro_batch=8, body=model.body, freeze_steps=1)
    for step, body_frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        task.loss(model, task.batch(step, 0)).backward()
        assert model.body.gpt.embed.weight.grad is None
        assert (model.body.gpt.blocks[0].mlp_norm.weight.grad is None) == body_frozen


def test_layer_decay_scales_each_layer_below_the_head():
    model = tiny_model()
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, device=CPU)
    scaled = layer_scaled(optimizer, model.layer_groups(), 0.5)
    scale_of = {id(p): g["lr_scale"] for g in scaled.param_groups for p in g["params"]}
    assert len(scale_of) == len(list(model.parameters()))
    assert all(scale_of[id(p)] == 1.0 for p in model.head.parameters())
    assert all(scale_of[id(p)] == 0.5 for p in model.body.gpt.blocks[1].parameters())
    assert all(scale_of[id(p)] == 0.25 for p in model.body.gpt.blocks[0].parameters())
    assert scale_of[id(model.body.gpt.embed.weight)] == 0.125
    decay_of = {id(p): g["weight_decay"] for g in scaled.param_groups for p in g["params"]}
    assert decay_of[id(model.head.out.weight)] == 0.01 and decay_of[id(model.head.out.bias)] == 0.0
    assert type(scaled) is type(optimizer)


def test_layer_decay_outside_its_range_is_refused():
    model = tiny_model()
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0, device=CPU)
    with pytest.raises(UserError, match="layer-lr-decay"):
        layer_scaled(optimizer, model.layer_groups(), 1.5)
