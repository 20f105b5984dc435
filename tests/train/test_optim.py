import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

from budgetlm.errors import UserError
from budgetlm.models.gpt import GPT
from budgetlm.models.config import ModelConfig
from budgetlm.train.lamb import Lamb
from budgetlm.train.runtime import cpu_has_fast_bf16
from budgetlm.train.muon import MuonWithAdamW, hidden_matrices
from budgetlm.train.optim import (
    OPTIMIZERS,
    build_optimizer,
    param_groups,
    parse_optim_args,
    validate_optim_args,
)

CPU = torch.device("cpu")
# A learning rate at which each optimizer visibly trains the tiny model in a few steps.
LR = {"adamw": 3e-3, "adam": 3e-3, "sgd": 0.3, "rmsprop": 3e-3, "adafactor": 0.1, "lamb": 2e-2, "muon": 3e-3}


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, context=16, n_layer=2, n_head=2, d_model=32))


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def build(model, name, **kw):
    return build_optimizer(model, name, lr=LR[name], weight_decay=0.1, device=CPU, **kw)


def set_lr(optimizer, lr):
    """What the training loop does each step."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- --optim-args ---------------------------------------------------------------------------------

def test_parse_optim_args_converts_values():
    args = parse_optim_args(" momentum=0.8, nesterov=false,ns_steps=3 ,adjust_lr_fn=original,eps=1e-6,")
    assert args == {"momentum": 0.8, "nesterov": False, "ns_steps": 3, "adjust_lr_fn": "original", "eps": 1e-6}
    assert type(args["ns_steps"]) is int and args["nesterov"] is False
    assert parse_optim_args("") == {}


@pytest.mark.parametrize("text", ["momentum", "momentum=", "=3", "a=1,a=2"])
def test_parse_optim_args_rejects_malformed_text(text):
    with pytest.raises(UserError, match="--optim-args"):
        parse_optim_args(text)


def test_unknown_optim_arg_names_the_key_and_the_allowed_keys():
    with pytest.raises(UserError) as e:
        validate_optim_args("sgd", {"betas": 0.9})
    assert "'betas'" in str(e.value)
    assert "allowed: dampening, decay_embeddings, momentum, nesterov" in str(e.value)


@pytest.mark.parametrize("name,args", [("sgd", {"nesterov": 1}), ("muon", {"ns_steps": 2.5}),
                                       ("muon", {"adjust_lr_fn": "fast"}), ("adam", {"eps": True})])
def test_optim_arg_of_the_wrong_type_is_refused(name, args):
    with pytest.raises(UserError, match="must be"):
        validate_optim_args(name, args)


def test_integer_optim_arg_is_accepted_where_a_float_is_expected():
    assert validate_optim_args("sgd", {"momentum": 1}) == {"momentum": 1.0}


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(UserError, match="choose one of adamw, adam, sgd, rmsprop, adafactor, lamb, muon"):
        build_optimizer(tiny_gpt(), "adagrad", lr=1e-3, weight_decay=0.0, device=CPU)


def test_out_of_range_hyperparameter_is_a_user_error():
    with pytest.raises(UserError, match="optimizer sgd"):
        build(tiny_gpt(), "sgd", extra={"momentum": -1})


# --- every optimizer ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
    model = tiny_gpt()
    optimizer = build(model, name)
    losses = [train_step(model, optimizer, batch()) for _ in range(8)]
    assert losses[-1] < 0.97 * losses[0]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_identically(name):
    model_a = tiny_gpt()
    opt_a = build(model_a, name)
    for _ in range(2):
        train_step(model_a, opt_a, batch())
    saved = io.BytesIO()
    torch.save(opt_a.state_dict(), saved)
    saved.seek(0)

    model_b, model_fresh = copy.deepcopy(model_a), copy.deepcopy(model_a)
    opt_b, opt_fresh = build(model_b, name), build(model_fresh, name)
    opt_b.load_state_dict(torch.load(saved, weights_only=True))
    # a new rate set through param_groups must reach the loaded optimizer's internals too
    for model, opt in ((model_a, opt_a), (model_b, opt_b), (model_fresh, opt_fresh)):
        set_lr(opt, LR[name] / 2)
        train_step(model, opt, batch())

    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    # without the loaded state the step differs: the comparison above can fail
    assert any(not torch.equal(pa, pf) for pa, pf in zip(model_a.parameters(), model_fresh.parameters()))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_kernels_on_cpu(name):
    assert build(tiny_gpt(), name).defaults["fused"] is True


# --- parameter groups -----------------------------------------------------------------------------

def test_no_decay_on_norms_and_embeddings_unless_asked():
    model = tiny_gpt()
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(groups):
        return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}

    plain = decayed(param_groups(model, 0.1))
    assert "embed.weight" not in plain and not any("norm" in n for n in plain)
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"} <= plain
    assert "embed.weight" in decayed(build(model, "adamw", extra={"decay_embeddings": True}).param_groups)


# --- Muon -----------------------------------------------------------------------------------------

def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    optimizer = build(model, "muon")
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    under_muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    under_adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    layers = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
    hidden = {f"blocks.{i}.{layer}.weight" for i in range(2) for layer in layers}
    assert under_muon == hidden
    assert under_adamw == set(names.values()) - hidden
    assert "embed.weight" in under_adamw  # also the tied output head
    assert all(p.dim() == 2 for g in optimizer.muon.param_groups for p in g["params"])


def test_hidden_matrices_skip_heads_biases_and_tied_weights():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.unembed = nn.Linear(8, 10, bias=False)
            self.unembed.weight = self.embed.weight
            self.head = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))

    net = Net()
    assert [id(p) for p in hidden_matrices(net)] == [id(net.body.weight)]


def test_muon_lr_scale_and_one_shared_rate():
    optimizer = build(tiny_gpt(), "muon", extra={"muon_lr_scale": 0.5, "adjust_lr_fn": "original"})
    set_lr(optimizer, 0.01)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.005)
    assert optimizer.muon.param_groups[0]["adjust_lr_fn"] == "original"
    assert all(g["lr"] == 0.01 for g in optimizer.adamw.param_groups)
    default = build(tiny_gpt(), "muon")
    assert default.muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert default.muon.param_groups[0]["lr_scale"] == 1.0


# --- LAMB -----------------------------------------------------------------------------------------

def lamb_reference(w, grads, lr, beta1, beta2, eps, weight_decay):
    """The paper's update, written out in numpy."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r = (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)
        u = r + weight_decay * w
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(u)
        trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = w - lr * trust * u
    return w


def test_lamb_first_step_by_hand():
    # m̂ = g, v̂ = g², so r = sign(g) = (1, -1); trust = ||(3, 4)|| / ||r|| = 5 / √2
    w = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    Lamb([w], lr=0.1, eps=0.0).step()
    shift = 0.1 * 5 / 2**0.5
    assert torch.allclose(w.detach(), torch.tensor([3 - shift, 4 + shift], dtype=torch.float64))


def test_lamb_matches_the_paper_over_three_steps():
    rng = np.random.default_rng(0)
    starts = [rng.normal(size=(3, 4)), rng.normal(size=5), np.zeros(3)]
    grads = [[rng.normal(size=s.shape) for _ in range(3)] for s in starts]
    decays = [0.1, 0.0, 0.1]
    params = [nn.Parameter(torch.tensor(s)) for s in starts]
    optimizer = Lamb([{"params": [p], "weight_decay": wd} for p, wd in zip(params, decays)],
                     lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    for t in range(3):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g[t])
        optimizer.step()
    for p, start, g, wd in zip(params, starts, grads, decays):
        expected = lamb_reference(start, g, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=wd)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-15)


def test_lamb_trust_ratio_is_one_for_a_zero_weight():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    Lamb([w], lr=0.1, eps=1e-6, weight_decay=0.1).step()
    assert torch.allclose(w.detach(), -0.1 * w.grad / (w.grad.abs() + 1e-6))


# --- our Muon (Newton–Schulz in fp32 where bf16 is slow) --------------------------------------------

def test_orthogonalize_sends_singular_values_near_one():
    from budgetlm.train.muon import orthogonalize

    g = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    for matrix in (g, g.T):
        s = torch.linalg.svdvals(orthogonalize(matrix))
        assert s.min() > 0.5 and s.max() < 1.6
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        cosine = (orthogonalize(matrix) * (u @ vh)).sum() / (orthogonalize(matrix).norm() * (u @ vh).norm())
        assert cosine > 0.95


def test_orthogonalize_a_batch_equals_each_matrix_alone():
    from budgetlm.train.muon import orthogonalize

    batch = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0))
    together = orthogonalize(batch)
    for matrix, result in zip(batch, together):
        assert torch.allclose(result, orthogonalize(matrix), atol=1e-5)


def test_muon_steps_matrices_of_one_shape_together_as_it_would_alone(monkeypatch):
    from budgetlm.train import muon

    torch.manual_seed(0)
    weights = [torch.randn(16, 8), torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 8)]
    grads = [torch.randn_like(w) for w in weights]

    def stepped(params_per_optimizer):
        params = [nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        for chunk in params_per_optimizer(params):
            muon.Muon(chunk, lr=0.02, weight_decay=0.1).step()
        return [p.detach() for p in params]

    alone = stepped(lambda params: [[p] for p in params])
    monkeypatch.setattr(muon, "BATCH_ELEMENTS", 2 * 16 * 8)  # the three 16×8 in batches of two and one
    together = stepped(lambda params: [params])
    for a, b in zip(alone, together):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(together[0], weights[0])


def test_muon_step_follows_its_rule_and_matches_torch():
    from budgetlm.train.muon import Muon, orthogonalize

    torch.manual_seed(0)
    w0 = torch.randn(32, 64)
    grad = torch.randn(32, 64)
    ours = nn.Parameter(w0.clone())
    ours.grad = grad.clone()
    Muon([ours], lr=0.02, weight_decay=0.1, momentum=0.9).step()
    buf = 0.1 * grad                      # lerp from zero
    update = grad.lerp(buf, 0.9)          # Nesterov
    expected = w0 * (1 - 0.02 * 0.1) - 0.02 * 0.2 * 64**0.5 * orthogonalize(update)
    assert torch.allclose(ours.detach(), expected, atol=1e-6)
    theirs = nn.Parameter(w0.clone())
    theirs.grad = grad.clone()
    torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw").step()
    assert torch.allclose(ours.detach(), theirs.detach(), atol=2e-3)  # theirs iterates in bf16


def test_muon_in_bf16_steps_as_the_stacked_and_converted_update_did():
    from budgetlm.train.muon import Muon, orthogonalize, stacked

    torch.manual_seed(0)
    w0, grads = [torch.randn(24, 40) for _ in range(3)], [torch.randn(24, 40) for _ in range(3)]
    assert torch.equal(stacked(grads, torch.bfloat16), torch.stack(grads).to(torch.bfloat16))
    params = [nn.Parameter(w.clone()) for w in w0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Muon(params, lr=0.02, weight_decay=0.1, momentum=0.9, ns_dtype=torch.bfloat16).step()
    updates = torch.stack([g.lerp(0.1 * g, 0.9) for g in grads])  # Nesterov, momentum from zero
    # the code before: the batch stacked in fp32, converted, orthogonalized, converted back, scaled, added
    ortho = orthogonalize(updates, dtype=torch.bfloat16).float()
    for p, w, o in zip(params, w0, ortho):
        expected = w * (1 - 0.02 * 0.1) - 0.02 * 0.2 * 40**0.5 * o
        assert torch.allclose(p.detach(), expected, atol=1e-6)
        assert not torch.allclose(p.detach(), w, atol=1e-3)


# --- skipping a step on the device (GradScaler's found_inf) ------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "sgd", "muon"])
def test_found_inf_skips_the_whole_update_and_zero_takes_it(name):
    """found_inf 1: weights and optimizer state untouched, even with NaN gradients; 0: the same update
    as without it. This is how a step's skip is decided without the host reading the loss."""
    tokens = batch()
    skipped, plain, flagged = tiny_gpt(), tiny_gpt(), tiny_gpt()
    optimizers = [build(m, name) for m in (skipped, plain, flagged)]
    assert all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)
    for model, optimizer in zip((skipped, plain, flagged), optimizers):
        train_step(model, optimizer, tokens)  # state exists (momentum, step counts) before the test
    before = copy.deepcopy((skipped.state_dict(), optimizers[0].state_dict()))
    skipped(tokens[:, :-1], tokens[:, 1:]).backward()
    for p in skipped.parameters():
        p.grad.fill_(float("nan"))
    optimizers[0].found_inf = torch.ones(())
    optimizers[0].step()
    after = (skipped.state_dict(), optimizers[0].state_dict())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    states = [s["state"] for s in (before[1], after[1])]
    assert all(torch.equal(states[0][i][k], states[1][i][k]) for i in states[0] for k in states[0][i])

    train_step(plain, optimizers[1], tokens)
    flagged(tokens[:, :-1], tokens[:, 1:]).backward()
    optimizers[2].found_inf = torch.zeros(())
    optimizers[2].step()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), flagged.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), skipped.parameters()))


def test_a_run_asked_for_fp32_orthogonalizes_in_fp32():
    model, cpu = tiny_gpt(), torch.device("cpu")
    exact = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.0, device=cpu, precision="fp32")
    assert exact.muon.ns_dtype == torch.float32
    if cpu_has_fast_bf16():  # elsewhere bf16 is never chosen
        fast = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.0, device=cpu, precision="bf16")
        assert fast.muon.ns_dtype == torch.bfloat16
