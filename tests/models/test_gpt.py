import pytest
import torch

from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.models.sampling import generate
from budgetlm.train.checkpoint import load_model, save_model
from tests.models.tiny_gpt import CANON, SMALL, forward_in_chunks, tiny_gpt, tokens


@pytest.mark.parametrize("config", [SMALL, CANON], ids=["plain", "canon"])
def test_changing_future_tokens_never_changes_earlier_logits(config):
    model = tiny_gpt(config)
    x = tokens(2, 32)
    y = x.clone()
    y[:, 20:] = tokens(2, 12)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_loss_is_cross_entropy_and_ignores_masked_targets():
    model = tiny_gpt()
    x = tokens(2, 16)
    y = tokens(2, 16)
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        assert torch.allclose(model(x, y), expected, atol=1e-5)
        y[:, 8:] = -100
        assert torch.allclose(model(x, y, reduction="sum"),
                              torch.nn.functional.cross_entropy(logits[:, :8].flatten(0, 1), y[:, :8].flatten(), reduction="sum"),
                              atol=1e-4)


def test_the_output_head_is_the_input_embedding():
    """One matrix, two uses: no second copy in the weights, and its gradient gathers both the input
    lookup (only the rows of tokens read) and the output projection (every row)."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    assert not any(p is not model.embed.weight and p.shape == model.embed.weight.shape for p in model.parameters())
    assert [k for k in model.state_dict() if k.endswith("weight") and model.state_dict()[k].shape[0] == 97] == \
        ["embed.weight"]
    x = torch.zeros(2, 8, dtype=torch.long)  # only token 0 is read
    y = tokens(2, 8)
    model(x, y).backward()
    both = model.embed.weight.grad.clone()
    model.zero_grad()
    cut = model.embed.register_forward_hook(lambda module, inputs, output: output.detach())
    model(x, y).backward()
    cut.remove()
    head_only = model.embed.weight.grad
    assert (head_only[1:].abs().sum(1) > 0).all()             # the head reaches every row
    lookup = both - head_only
    assert lookup[0].abs().sum() > 0 and torch.all(lookup[1:] == 0)  # the lookup only row 0


def test_tied_embedding_and_parameter_count():
    model = GPT(SMALL)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embedding=False) == model.num_params() - 97 * 32
    assert model.flops_per_token() > 6 * model.num_params()


@pytest.mark.parametrize("config", [SMALL, CANON], ids=["plain", "canon"])
def test_cached_generation_equals_uncached(config):
    model = tiny_gpt(config)
    prompt = tokens(1, 5)
    # greedy over more than the context, so the cache window slides
    cached = [int(t) for t in generate(model, prompt, 60, temperature=0)]
    # the uncached path re-reads the whole window; compare only before the first slide
    plain = [int(t) for t in generate(model, prompt, 60, temperature=0, use_cache=False)]
    first_slide = SMALL.context - prompt.shape[1] + 1
    assert cached[:first_slide] == plain[:first_slide]
    assert len(cached) == 60


@pytest.mark.parametrize("config", [SMALL, CANON], ids=["plain", "canon"])
def test_cached_logits_match_full_forward(config):
    model = tiny_gpt(config)
    x = tokens(2, 20)
    with torch.no_grad():
        full = model(x)
        stepped = forward_in_chunks(model, x, (12, 13))
    assert torch.allclose(stepped, full, atol=1e-5)


def test_sampling_is_seeded():
    model = GPT(SMALL).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    draw = lambda seed: [int(t) for t in generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9,
                                                   generator=torch.Generator().manual_seed(seed))]
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize("config", [SMALL, CANON], ids=["plain", "canon"])
def test_saved_model_reloads_to_identical_logits(tmp_path, config):
    model = tiny_gpt(config)
    save_model(tmp_path, model, config.to_dict(), tokenizer=None)
    loaded, config, tok = load_model(tmp_path)
    x = tokens(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert config["arch"] == "gpt" and tok is None


def test_bf16_weights_keep_fp32_rotary_tables_and_track_the_fp32_model():
    model = tiny_gpt()
    x = tokens(2, 20)
    with torch.no_grad():
        reference = model(x)
        model.cast_weights(torch.bfloat16)
        low = model(x)
        stepped = forward_in_chunks(model, x, (12,))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rotary.cos.dtype == torch.float32 and low.dtype == torch.bfloat16
    # bf16 keeps about 3 significant digits: close to fp32, far from exact
    assert torch.allclose(low.float(), reference, atol=0.05) and not torch.equal(low.float(), reference)
    assert torch.allclose(stepped.float(), low.float(), atol=0.05)


def test_training_loss_takes_the_blockwise_path_with_the_same_value_and_gradients():
    torch.manual_seed(0)
    model = GPT(SMALL)
    x, y = tokens(2, 16), tokens(2, 16)
    blockwise = model(x, y)
    blockwise.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = model(x, y, reduction="none").mean()  # per-token losses take the plain path
    plain.backward()
    took_blockwise = lambda loss: "LinearCrossEntropy" in str(loss.grad_fn.next_functions)
    assert took_blockwise(blockwise) and not took_blockwise(plain)
    assert torch.allclose(blockwise, plain, atol=1e-6)
    for a, p in zip(grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_attention_dropout_follows_dropout_unless_given():
    def attention_rates(**kw):
        model = GPT(ModelConfig.from_dict(dict(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32, **kw)))
        return {block.attn.dropout for block in model.blocks}

    assert attention_rates(dropout=0.1) == {0.1}  # configs saved before the option keep their behaviour
    assert {b.attn.dropout for b in GPT(ModelConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32,
                                                    dropout=0.1)).blocks} == {0.0}  # a new config: off by default
    assert attention_rates(dropout=0.1, attention_dropout=0.0) == {0.0}
    assert attention_rates(dropout=0.0, attention_dropout=0.2) == {0.2}
    # off: training-mode forward passes agree, so the only randomness left is the residual dropout
    model = GPT(ModelConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32, attention_dropout=0.0)).train()
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(idx), model(idx))
