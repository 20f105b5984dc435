import pytest
import torch
import torch.nn.functional as F

from budgetlm.models.classifier import (
    ClassificationHead,
    Classifier,
    ClassifierConfig,
    Ensemble,
    GPTBody,
    pool,
)
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.models.registry import build

TINY_GPT = ModelConfig(vocab_size=64, context=32, n_layer=2, n_head=2, d_model=32)


def gpt_classifier(pooling="mean", n_classes=3) -> Classifier:
    torch.manual_seed(0)
    config = ClassifierConfig(body="gpt", body_config=TINY_GPT.to_dict(), labels=[str(i) for i in range(n_classes)],
                              pooling=pooling)
    return Classifier(config)


def padded_pair(short_len=5, long_len=12, vocab=64):
    """A short row alone, and the same row right-padded in a batch beside a longer one."""
    g = torch.Generator().manual_seed(1)
    short = torch.randint(1, vocab, (short_len,), generator=g)
    long = torch.randint(1, vocab, (long_len,), generator=g)
    ids = torch.zeros(2, long_len, dtype=torch.int64)
    ids[0, :short_len], ids[1] = short, long
    mask = (torch.arange(long_len) < torch.tensor([[short_len], [long_len]])).long()
    return short[None], torch.ones(1, short_len, dtype=torch.int64), ids, mask


def test_pooling_reads_only_real_tokens():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "mean")[1], hidden[1].mean(0))
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pool(hidden, mask, "first"), hidden[:, 0])


def test_head_forward_backward_shapes():
    head = ClassificationHead(width=16, n_classes=5, pooling="mean", dropout=0.1)
    hidden = torch.randn(4, 7, 16, requires_grad=True)
    mask = torch.ones(4, 7, dtype=torch.int64)
    logits = head(hidden, mask)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 4])).backward()
    assert hidden.grad.shape == hidden.shape and hidden.grad.abs().sum() > 0
    assert head.out.weight.grad.shape == (5, 16)


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_gradients_reach_every_layer(pooling):
    model = gpt_classifier(pooling)
    ids = torch.randint(1, 64, (4, 9))
    logits = model(ids, torch.ones_like(ids))
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        # a causal model's first position attends only to itself: a softmax over one score has no
        # gradient, so with first-token pooling the query and key norms get none (up to rounding)
        if pooling == "first" and name.endswith(("q_norm.weight", "k_norm.weight")):
            assert p.grad is None or p.grad.abs().max() < 1e-6, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_does_not_change_a_gpt_prediction(pooling):
    model = gpt_classifier(pooling).eval()
    alone_ids, alone_mask, ids, mask = padded_pair()
    with torch.no_grad():
        alone, batch = model(alone_ids, alone_mask), model(ids, mask)
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)


def test_layer_groups_cover_each_parameter_once():
    model = gpt_classifier()
    groups = model.layer_groups()
    assert len(groups) == 1 + TINY_GPT.n_layer + 1  # embedding, blocks, head
    seen = [id(p) for group in groups for p in group]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert groups[-1] == list(model.head.parameters())


def test_rebuilt_from_its_config_dict():
    model = gpt_classifier("last", n_classes=2)
    rebuilt = build(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids, torch.ones_like(ids)), model.eval()(ids, torch.ones_like(ids)))
    assert rebuilt.config.labels == ["0", "1"] and rebuilt.config.pooling == "last"


def test_gpt_body_wraps_a_pretrained_gpt_unchanged():
    gpt = GPT(TINY_GPT)
    body = GPTBody(gpt)
    ids = torch.randint(1, 64, (1, 5))
    assert torch.equal(body(ids, torch.ones_like(ids)), gpt.hidden(ids))
    assert body.width == 32 and body.max_length == 32


def test_lm_loss_is_the_pretrained_gpts_own_loss_and_ignores_padding():
    model = gpt_classifier().eval()
    alone_ids, alone_mask, ids, mask = padded_pair()
    with torch.no_grad():
        logits, lm = model(alone_ids, alone_mask, lm_loss=True)
        own = model.body.gpt(alone_ids[:, :-1], alone_ids[:, 1:])
        torch.testing.assert_close(lm, own)
        torch.testing.assert_close(logits, model(alone_ids, alone_mask))
        # the padded batch: the mean over both rows' real next tokens, nothing from the padding
        _, batch_lm = model(ids, mask, lm_loss=True)
        long_lm = model.body.gpt(ids[1:, :-1], ids[1:, 1:])
        short_n, long_n = alone_ids.shape[1] - 1, ids.shape[1] - 1
        torch.testing.assert_close(batch_lm, (own * short_n + long_lm * long_n) / (short_n + long_n))


def test_lm_loss_trains_the_tied_embedding():
    model = gpt_classifier()
    ids = torch.randint(1, 64, (3, 8))
    _, lm = model(ids, torch.ones_like(ids), lm_loss=True)
    lm.backward()
    assert model.body.gpt.embed.weight.grad.abs().sum() > 0
    assert model.head.out.weight.grad is None  # the head plays no part in the language-model loss


def test_an_ensemble_averages_its_members_probabilities_and_rebuilds_from_its_config():
    members = [gpt_classifier(), gpt_classifier()]
    torch.manual_seed(5)
    for p in members[1].parameters():  # two different members
        p.data += 0.1 * torch.randn_like(p)
    config = ClassifierConfig.from_dict({**members[0].config.to_dict(), "members": 2})
    ensemble = Ensemble(config, members).eval()
    ids = torch.randint(1, 64, (4, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = (members[0].eval()(ids, mask).softmax(-1) + members[1].eval()(ids, mask).softmax(-1)) / 2
        torch.testing.assert_close(ensemble(ids, mask).softmax(-1), expected)
        rebuilt = build(config.to_dict())
        assert isinstance(rebuilt, Ensemble) and len(rebuilt.members) == 2
        rebuilt.load_state_dict(ensemble.state_dict())
        torch.testing.assert_close(rebuilt.eval()(ids, mask), ensemble(ids, mask))
    assert isinstance(build(members[0].config.to_dict()), Classifier)  # one member: a plain classifier


def test_hf_encoder_body_ignores_padding():
    transformers = pytest.importorskip("transformers")
    from budgetlm.models.hf_encoder import HFEncoder

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    body = HFEncoder.from_config(config.to_dict())
    model = Classifier(ClassifierConfig(body="hf", body_config=body.config_dict(), labels=["a", "b"]), body).eval()
    alone_ids, alone_mask, ids, mask = padded_pair()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[0], model(alone_ids, alone_mask)[0], atol=1e-5, rtol=1e-5)
    layers = body.layers()
    assert len(layers) == 1 + 2  # embeddings (and the pooler), then each layer
    assert sum(len(g) for g in layers) == len(list(body.parameters()))


def test_hf_encoder_fast_paths_on_cpu_keep_the_outputs():
    transformers = pytest.importorskip("transformers")
    from budgetlm.models.hf_encoder import HFEncoder
    from budgetlm.train.kernels import FastCPUDropout, apply_kernels

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa")
    torch.manual_seed(0)
    body = apply_kernels(HFEncoder.from_config(config.to_dict()), torch.device("cpu"))
    dropouts = [m for m in body.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is FastCPUDropout for m in dropouts)
    if not hasattr(body.model, "set_attn_implementation"):
        pytest.skip("this transformers cannot switch attention after loading")
    body.eval()
    _, _, ids, mask = padded_pair()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        written_out = body(ids, mask)
        assert body.model.config._attn_implementation == "eager"
        body.model.set_attn_implementation("sdpa")
        library = body.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(written_out[mask.bool()], library[mask.bool()], atol=0.05, rtol=0.05)
    with torch.no_grad():
        body(ids, mask)
    assert body.model.config._attn_implementation == body.own_attention == "sdpa"  # fp32: the model's own choice
