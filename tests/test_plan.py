import json

import pytest
import torch

from budgetlm import plan as planner
from budgetlm.errors import UserError
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
    small_corpus = plan(300, train_tokens=150_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert big_corpus.expected_epochs < 1 and big_corpus.dropout == 0
    assert small_corpus.expected_epochs > planner.REPEATS_BEFORE_DROPOUT and small_corpus.dropout > 0
    assert small_corpus.expected_epochs == pytest.approx(small_corpus.expected_tokens / 150_000, rel=1e-3)
    assert "dropout" in small_corpus.describe() and "dropout" not in big_corpus.describe()
    assert big_corpus.bpe_dropout == 0 and small_corpus.bpe_dropout > 0
    assert small_corpus.expected_epochs > planner.REPEATS_BEFORE_BPE_DROPOUT
    assert "BPE-dropout" in small_corpus.describe()
    # between the two thresholds: dropout in the model, the text as it is
    middling = plan(300, train_tokens=600_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert planner.REPEATS_BEFORE_DROPOUT < middling.expected_epochs <= planner.REPEATS_BEFORE_BPE_DROPOUT
    assert middling.dropout > 0 and middling.bpe_dropout == 0
    assert middling.ema == 0 and middling.canon == 0


def test_averaging_and_canon_layers_are_planned_for_a_gpt_reading_its_text_more_than_ten_times():
    many = plan(300, train_tokens=150_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert many.expected_epochs > planner.REPEATS_BEFORE_AVERAGE
    assert many.ema == planner.REPEAT_EMA and many.canon == planner.REPEAT_CANON
    assert "moving average" in many.describe() and "Canon" in many.describe()
    few = plan(300, train_tokens=3_000_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK)
    assert few.expected_epochs <= planner.REPEATS_BEFORE_AVERAGE and few.ema == 0 and few.canon == 0
    encoder = plan(300, train_tokens=150_000, vocab=2048, device=CPU, precision="fp32", peak_flops=PEAK, arch="bert")
    assert encoder.expected_epochs > planner.REPEATS_BEFORE_AVERAGE and encoder.ema == 0 and encoder.canon == 0
    # flags win over the plan; the record counts Canon layers' slower step in the tokens it expects
    from budgetlm.models.config import ModelConfig
    assert planner.model_for(ModelConfig(), 2048, many).canon == planner.REPEAT_CANON
    assert planner.model_for(ModelConfig(canon=0), 2048, many).canon == 0
    assert planner.given_or_planned(0.0, many, "ema", 0.0) == 0.0
    assert planner.given_or_planned(None, many, "ema", 0.0) == planner.REPEAT_EMA


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


def test_more_flops_never_plans_a_smaller_model():
    plans = [plan(None, budget_flops=f, train_tokens=10**9, vocab=8192, device=CPU, precision="fp32", peak_flops=PEAK)
             for f in (1e13, 1e14, 1e15, 1e16, 1e17, 1e18)]
    shapes = [shape(p) for p in plans]
    assert shapes == sorted(shapes) and shapes[0] < shapes[-1]
    for p, flops in zip(plans, (1e13, 1e14, 1e15, 1e16, 1e17, 1e18)):
        # the tokens a FLOP budget plans are the budget over the shape's FLOPs per token, whatever the device's speed
        assert p.expected_tokens * flops_per_token(p.n_layer, p.d_model, 8192, p.context) == pytest.approx(flops, rel=1e-6)
        assert p.budget_flops == flops


def test_time_and_flops_together_plan_for_the_tighter():
    by_time = plan(300, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    both = plan(300, budget_flops=1e12, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    assert both.expected_tokens < by_time.expected_tokens


@pytest.mark.parametrize("limit_mib", [100, 200, 500, 4000])
def test_no_planned_shape_exceeds_the_memory_it_may_use(limit_mib):
    limit = limit_mib * 2**20
    free = plan(30000, train_tokens=10**10, vocab=32768, device=CPU, precision="fp32", peak_flops=PEAK)
    capped = plan(30000, train_tokens=10**10, vocab=32768, device=CPU, precision="fp32", peak_flops=PEAK,
                  memory_limit=limit)
    need = planner.memory_estimate(capped.n_layer, capped.d_model, capped.n_head, capped.context, 32768,
                                   capped.micro_batch, "fp32")
    assert need == capped.memory_bytes <= planner.MEMORY_SHARE * limit
    assert shape(capped) <= shape(free)
    assert all(c["memory_bytes"] <= planner.MEMORY_SHARE * limit for c in capped.candidates if c["fits"])
    if limit_mib == 100:
        assert shape(capped) < shape(free)  # the cap, not the budget, chose this size


def test_memory_too_small_for_any_shape_is_a_clear_error():
    with pytest.raises(UserError, match="MiB"):
        plan(300, train_tokens=10**6, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK, memory_limit=2**20)


def test_memory_estimate_grows_with_what_a_step_holds():
    base = planner.memory_estimate(4, 128, 2, 256, 4096, 8, "fp32")
    assert planner.memory_estimate(4, 128, 2, 256, 4096, 16, "fp32") > base  # activations and logits
    assert planner.memory_estimate(8, 128, 2, 256, 4096, 8, "fp32") > base   # parameters and activations
    assert planner.memory_estimate(4, 128, 2, 256, 4096, 8, "bf16") < base   # 16-bit activations
    # at least the fp32 weights, gradients and two moments of every parameter
    params = 12 * 4 * 128**2 + 4096 * 128
    assert base > 16 * params


def test_the_learning_rate_is_planned_from_width():
    small = plan(60, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    large = plan(60000, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    assert small.d_model < large.d_model
    assert small.lr * small.d_model == pytest.approx(large.lr * large.d_model)  # 1/width
    assert planner.learning_rate(128, 2048, "muon") == pytest.approx(3e-3)     # measured at 4x128 (docs/planner.md)
    assert planner.planned_lr(None, small.d_model, 2048, "muon", small) == small.lr
    assert planner.planned_lr(1e-4, small.d_model, 2048, "muon", small) == 1e-4


def test_probed_speeds_are_cached_per_device_and_shape_and_bounded_by_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path))
    calls = []

    def fake_speed(c, vocab, device, precision, optim, seconds):
        calls.append((c["n_layer"], c["d_model"], seconds))
        return 1000.0 * c["d_model"]

    monkeypatch.setattr(planner, "step_speed", fake_speed)
    monkeypatch.setattr(planner, "machine_busy", lambda: False)
    first = plan(600, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    ranked = sorted(first.candidates, key=lambda c: c["predicted_loss"])
    speeds = planner.probe_speeds(ranked, 600, vocab=4096, device=CPU, precision="fp32")
    assert len(calls) == planner.PROBE_SHAPES and set(speeds) == {(l, d) for l, d, _ in calls}
    # no more than 5% of the budget, nor 30 s, in all
    assert sum(s for *_, s in calls) <= min(0.05 * 600, planner.PROBE_MAX_S) + 1e-9
    calls.clear()
    again = planner.probe_speeds(ranked, 600, vocab=4096, device=CPU, precision="fp32")
    assert calls == [] and again == speeds  # remembered: no second probe
    # a budget whose 5% cannot hold a probe measures nothing; one that holds a single probe measures the best-ranked
    assert planner.probe_speeds(ranked, 10, vocab=8192, device=CPU, precision="fp32") == {}
    calls.clear()
    assert list(planner.probe_speeds(ranked, 30, vocab=8192, device=CPU, precision="fp32")) == [
        (ranked[0]["n_layer"], ranked[0]["d_model"])]
    assert len(calls) == 1
    probed = plan(600, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK, speeds=speeds)
    kinds = {(c["n_layer"], c["d_model"]): c["speed"] for c in probed.candidates}
    assert {k for k, v in kinds.items() if v == "measured"} == set(speeds)
    assert set(kinds.values()) == {"measured", "scaled"}
    for c in probed.candidates:
        if c["speed"] == "measured":
            assert c["tokens_per_s"] == speeds[(c["n_layer"], c["d_model"])]


def test_plan_record_lists_the_candidates_and_says_what_it_ranks_by():
    from budgetlm.models.config import ModelConfig

    p = plan(300, train_tokens=300_000, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    mc = planner.model_for(ModelConfig(), 4096, p)
    r = planner.plan_record(p, mc, n_params=1, n_params_without_embedding=1, flops_per_token_=1e6, device="cpu",
                            precision="fp32", compiled=False, budget={"seconds": 300.0}, data={"train_tokens": 300_000,
                            "vocab_size": 4096, "bpe_dropout": p.bpe_dropout, "bpe_passes": 4},
                            batch_tokens=p.batch_tokens, micro_batch=p.micro_batch, micro_steps=1, lr=p.lr,
                            warmup=0.02, optim="muon", schedule="wsd", ema=p.ema)
    assert (r["model"]["n_layer"], r["model"]["d_model"], r["model"]["n_head"]) == (p.n_layer, p.d_model, p.n_head)
    assert {g["name"] for g in r["regularizers"]} == {"dropout"}  # about 9 epochs of a small text: 4 < 9 <= 10
    assert r["training"]["warmup_steps"] == round(0.02 * r["training"]["steps"])
    assert "not a forecast" in r["ranking"]["by"]
    text = planner.plan_text(r)
    assert "dropout" in text and f"{p.n_layer}x{p.d_model}" in text
    assert json.loads(json.dumps(r)) == r  # plain data


def test_the_probe_times_real_steps_and_leaves_the_runs_random_state():
    c = {"n_layer": 1, "d_model": 32, "n_head": 1, "context": 16, "micro_batch": 2}
    assert planner.step_speed(c, 300, CPU, "fp32", "adamw", 0.0) is None  # no time: no figure, not a guess
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    speed = planner.step_speed(c, 300, CPU, "fp32", "adamw", 1.5)  # the first call paid the imports
    assert speed is not None and speed > 0
    assert torch.equal(torch.random.get_rng_state(), before)  # the run's seed decides its weights, probed or not


def test_a_speed_probed_on_a_busy_machine_is_used_but_not_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDGETLM_CACHE", str(tmp_path))
    monkeypatch.setattr(planner, "step_speed", lambda c, *a: 1000.0)
    monkeypatch.setattr(planner, "machine_busy", lambda: True)
    first = plan(600, train_tokens=10**9, vocab=4096, device=CPU, precision="fp32", peak_flops=PEAK)
    ranked = sorted(first.candidates, key=lambda c: c["predicted_loss"])
    assert set(planner.probe_speeds(ranked, 600, vocab=4096, device=CPU, precision="fp32").values()) == {1000.0}
    assert not (tmp_path / "speed_probes.json").exists()


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
