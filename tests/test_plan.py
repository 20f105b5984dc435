import json

import pytest
import torch

from budgetlm import plan as planner
from budgetlm.plan import LADDER, context_for, flops_per_token, plan, predicted_loss

CPU = torch.device("cpu")
PEAK = 150e9  # about this project's 2-core CPU in fp32


def shape(p):
    return p.n_layer, p.d_model


def test_more_time_never_plans_a_smaller_model():
    sizes = [plan(s, train_tokens=10**9, vocab=8192, device=CPU, precision="fp32", peak_flops=PEAK)
             for s in (30, 300, 3000, 30000, 300000)]
    widths = [p.d_model for p in sizes]
    assert widths == sorted(widths)
    assert widths[0] < widths[-1]


def test_a_small_corpus_plans_a_smaller_model_than_a_large_one():
    # A model far larger than a 100k-token corpus would memorize it (MAX_PARAMS_PER_TOKEN)
    small = plan(36000, train_tokens=10**5, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    large = plan(36000, train_tokens=10**10, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert small.d_model < large.d_model


@pytest.mark.parametrize("train_tokens", [3_000, 300_000, 3_000_000, 10**9])
@pytest.mark.parametrize("budget_s", [30, 300, 3000, 30000])
def test_the_memorization_guard_holds_at_every_budget(train_tokens, budget_s):
    """No planned body holds more than MAX_PARAMS_PER_TOKEN parameters per unique training token, unless it is
    the ladder's smallest; and on the same data more budget never plans a smaller model."""
    p = plan(budget_s, train_tokens=train_tokens, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    body = 12 * p.n_layer * p.d_model**2
    assert body <= planner.MAX_PARAMS_PER_TOKEN * train_tokens or (p.n_layer, p.d_model) == LADDER[0][:2]
    more = plan(budget_s * 4, train_tokens=train_tokens, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    assert (more.n_layer, more.d_model) >= (p.n_layer, p.d_model)


def test_a_larger_vocabulary_keeps_the_shape_on_a_small_corpus():
    # the memorization cap counts the body only: tinyshakespeare in 4,096 tokens (307k of them) keeps
    # 4x128, which measured better than the 3x96 a cap counting the embedding had chosen
    for precision, peak in (("fp32", PEAK), ("bf16", 400e9)):
        assert shape(plan(300, train_tokens=307_604, vocab=4096, device=CPU, precision=precision, peak_flops=peak)) == (4, 128)
        assert shape(plan(300, train_tokens=346_859, vocab=2048, device=CPU, precision=precision, peak_flops=peak)) == (4, 128)


def test_batch_is_whole_micro_batches_and_expected_tokens_follow_the_flops():
    for budget in (60, 600, 6000):
        p = plan(budget, train_tokens=10**8, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
        assert p.batch_tokens % (p.micro_batch * p.context) == 0
        per_token = flops_per_token(p.n_layer, p.d_model, 4096, p.context)
        spent = p.expected_tokens * per_token / (planner.efficiency(p.d_model, CPU) * PEAK * planner.OVERHEAD)
        assert spent == pytest.approx(budget, rel=1e-3)


def test_dropout_is_planned_only_when_the_budget_repeats_the_corpus_many_times():
    big_corpus = plan(300, train_tokens=10**9, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    small_corpus = plan(300, train_tokens=300_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert big_corpus.expected_epochs < 1 and big_corpus.dropout == 0
    assert small_corpus.expected_epochs > planner.REPEATS_BEFORE_DROPOUT and small_corpus.dropout > 0
    assert small_corpus.expected_epochs == pytest.approx(small_corpus.expected_tokens / 300_000, rel=1e-3)
    assert "dropout" in small_corpus.describe() and "dropout" not in big_corpus.describe()
    assert big_corpus.bpe_dropout == 0 and small_corpus.bpe_dropout > 0
    assert small_corpus.expected_epochs > planner.REPEATS_BEFORE_BPE_DROPOUT
    assert "BPE-dropout" in small_corpus.describe()
    # between the two thresholds: dropout in the model, the text as it is
    middling = plan(300, train_tokens=600_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert planner.REPEATS_BEFORE_DROPOUT < middling.expected_epochs <= planner.REPEATS_BEFORE_BPE_DROPOUT
    assert middling.dropout > 0 and middling.bpe_dropout == 0
    # neither a moving average nor Canon layers is planned: each paid on one corpus of two (docs/planner.md)
    assert not hasattr(small_corpus, "ema") and not hasattr(small_corpus, "canon")
    assert "moving average" not in small_corpus.describe() and "Canon" not in small_corpus.describe()


def test_bpe_passes_follow_the_epochs_the_run_will_read():
    assert planner.bpe_passes(3.2) == 3  # the clean pass and three noisy ones: 4 for 3.2 epochs
    assert planner.bpe_passes(1.5) == 1
    assert planner.bpe_passes(400) == planner.MAX_BPE_PASSES
    assert planner.bpe_passes(None) == planner.MAX_BPE_PASSES


def test_predicted_loss_falls_with_data_and_repeats_are_discounted():
    n = 10**7
    assert predicted_loss(n, 2e8, 1e9) < predicted_loss(n, 1e8, 1e9)
    # 100 epochs of 1M tokens are worth less than 100M unique tokens, and more than one epoch
    repeated = predicted_loss(n, 1e8, 1e6)
    assert predicted_loss(n, 1e8, 1e8) < repeated < predicted_loss(n, 1e6, 1e6)


def test_context_grows_with_width():
    contexts = [context_for(d) for _, d, _ in LADDER]
    assert contexts == sorted(contexts)


def test_device_peak_remembers_the_best_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path))
    measured = iter([100e9, 80e9])
    monkeypatch.setattr(planner, "matmul_peak", lambda device, dtype: next(measured))
    assert planner.device_peak(CPU, torch.float32) == 100e9
    # a slower measurement under load does not change the plan
    assert planner.device_peak(CPU, torch.float32) == 100e9
    saved = json.loads((tmp_path / "device_peaks.json").read_text())
    assert list(saved.values()) == [100e9]


def test_bf16_plans_fewer_tokens_than_its_peak_alone_promises():
    # bf16 matmuls run 4x faster here, but a small model's step is bound by per-op overhead that does
    # not shrink with them: the planner must not expect 4x the fp32 tokens (docs/planner.md)
    fp32 = plan(600, train_tokens=10**6, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    bf16 = plan(600, train_tokens=10**6, vocab=4096, device=CPU, precision="bf16", peak_flops=4 * PEAK)
    assert shape(bf16) == shape(fp32)
    assert fp32.expected_tokens < bf16.expected_tokens < 2.5 * fp32.expected_tokens
    assert all(planner.efficiency(d, CPU, "bf16") < planner.efficiency(d, CPU, "fp32") for d in (64, 128, 192, 384))


def test_each_architecture_has_its_own_flops_per_token_and_the_models_agree():
    from budgetlm.models.bert import BERT
    from budgetlm.models.config import ModelConfig
    from budgetlm.models.gpt import GPT
    from budgetlm.models.t5 import T5

    shape = dict(n_layer=2, d_model=64, vocab=1024, context=128)
    gpt, bert, t5 = (flops_per_token(**shape, arch=a) for a in ("gpt", "bert", "t5"))
    # the encoder skips the vocabulary projection for the 75% of positions that are not masked
    assert gpt - bert == pytest.approx(6 * 1024 * 64 * 0.75)
    # two stacks and cross-attention cost more than one stack where the body outweighs the head; the head reads
    # only the targets, so where it dominates (small width, large vocabulary) the T5 costs less
    wide = dict(shape, d_model=512)
    assert flops_per_token(**wide, arch="t5") > flops_per_token(**wide, arch="gpt")
    assert t5 < gpt
    config = ModelConfig(vocab_size=1024, context=128, n_layer=2, d_model=64, n_head=2)
    for arch, model, planned in (("gpt", GPT, gpt), ("bert", BERT, bert), ("t5", T5, t5)):
        built = model(ModelConfig(**{**config.__dict__, "arch": arch}))
        assert built.flops_per_token() == pytest.approx(planned, rel=0.02), arch  # the planner counts what is built


def test_an_encoder_decoder_plans_no_larger_than_a_decoder():
    common = dict(train_tokens=300_000, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    for budget_s in (60, 180, 600):
        t5, gpt = plan(budget_s, arch="t5", **common), plan(budget_s, **common)
        assert shape(t5) <= shape(gpt)  # twice the body's parameters for a shape: the guard stops it sooner
