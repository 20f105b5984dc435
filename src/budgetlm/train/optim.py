"""Optimizers by name, their parameter groups, and their extra arguments (`--optim-args k=v,...`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from budgetlm.errors import UserError
from budgetlm.train.lamb import Lamb
from budgetlm.train.muon import Muon, MuonWithAdamW, hidden_matrices
from budgetlm.train.runtime import cpu_has_fast_bf16

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adafactor", "lamb", "muon")  # as config.OPTIMIZERS

# Peak learning rate of each optimizer relative to AdamW's (Muon's update is matched to AdamW's RMS).
LR_RELATIVE_TO_ADAMW = {"adamw": 1.0, "adam": 1.0, "muon": 1.0, "rmsprop": 0.5, "lamb": 5.0, "adafactor": 5.0,
                        "sgd": 100.0}


def default_lr(d_model: int, optim: str = "adamw") -> float:
    """Peak learning rate shrinking with width (µP-like 1/width scaling, AdamW anchored at 1.5e-3 for d_model 256)."""
    return 1.5e-3 * 256 / d_model * LR_RELATIVE_TO_ADAMW[optim]


# Extra arguments each optimizer accepts: a type, or a tuple of the allowed strings.
COMMON_ARGS: dict = {"decay_embeddings": bool}
OPTIM_ARGS: dict[str, dict] = {
    "adamw": {"eps": float, "amsgrad": bool},
    "adam": {"eps": float, "amsgrad": bool},
    "sgd": {"momentum": float, "nesterov": bool, "dampening": float},
    "rmsprop": {"alpha": float, "momentum": float, "centered": bool, "eps": float},
    "adafactor": {"beta2_decay": float, "eps1": float, "eps2": float, "d": float},
    "lamb": {"eps": float},
    "muon": {"momentum": float, "nesterov": bool, "ns_steps": int,
             "adjust_lr_fn": ("match_rms_adamw", "original"), "muon_lr_scale": float},
}


def parse_optim_args(text: str) -> dict:
    """"momentum=0.8,nesterov=false" → {"momentum": 0.8, "nesterov": False}: values become int,
    float, bool (true/false) or else stay strings."""
    args: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key or not raw:
            raise UserError(f"--optim-args: {item!r} is not key=value; write e.g. momentum=0.9,nesterov=false")
        if key in args:
            raise UserError(f"--optim-args: {key!r} is given twice")
        args[key] = _value(raw)
    return args


def _value(raw: str) -> int | float | bool | str:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def validate_optim_args(name: str, args: dict) -> dict:
    """The extra arguments checked against what optimizer `name` accepts, ints widened to floats
    where floats are expected."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    allowed = {**COMMON_ARGS, **OPTIM_ARGS[name]}
    checked = {}
    for key, value in args.items():
        if key not in allowed:
            raise UserError(f"--optim-args: {name} takes no {key!r}; allowed: {', '.join(sorted(allowed))}")
        want = allowed[key]
        if isinstance(want, tuple):
            ok = value in want
            expected = " or ".join(want)
        elif want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value, expected = float(value) if ok else value, "a number"
        else:
            ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
            expected = {bool: "true or false", int: "an integer"}[want]
        if not ok:
            raise UserError(f"--optim-args: {key} must be {expected}, got {value!r}")
        checked[key] = value
    return checked


def param_groups(model: nn.Module, weight_decay: float, *, decay_embeddings: bool = False,
                 exclude: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Weight decay on weight matrices only: not on norms and biases, nor on embeddings unless
    `decay_embeddings` (decaying an embedding pulls rare tokens' vectors to zero, which only hurts).
    Parameters in `exclude` are left to another optimizer."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        is_decayed = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_decayed else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, name: str = "adamw", *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float | None = None,
                    nesterov: bool = True, eps: float = 1e-8, extra: dict | None = None,
                    device: torch.device, precision: str | None = None) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`'s trainable parameters. `momentum` None takes each
    optimizer's own default (sgd 0.9, rmsprop 0, muon 0.95); keys in `extra` override the keywords.
    `precision` "fp32" keeps Muon's orthogonalization in fp32 too (else bf16 where the device is fast at it)."""
    args = validate_optim_args(name, extra or {})
    decay_embeddings = args.pop("decay_embeddings", False)
    # Fused kernels do the whole update in one pass per parameter (CPU and CUDA).
    fused = device.type in ("cpu", "cuda")

    def groups(exclude=()):
        return param_groups(model, weight_decay, decay_embeddings=decay_embeddings, exclude=exclude)

    def with_momentum(default: float) -> dict:
        return {"momentum": default if momentum is None else momentum, **args}

    try:
        if name in ("adamw", "adam"):
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            return cls(groups(), lr=lr, fused=fused, **{"betas": betas, "eps": eps, **args})
        if name == "sgd":
            return torch.optim.SGD(groups(), lr=lr, fused=fused, **{"nesterov": nesterov, **with_momentum(0.9)})
        if name == "rmsprop":
            return torch.optim.RMSprop(groups(), lr=lr, **{"eps": eps, **with_momentum(0.0)})
        if name == "adafactor":
            eps_pair = (args.pop("eps1", None), args.pop("eps2", 1e-3))
            return torch.optim.Adafactor(groups(), lr=lr, eps=eps_pair, **args)
        if name == "lamb":
            return Lamb(groups(), lr=lr, **{"betas": betas, "eps": eps, **args})
        return _muon(model, groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused,
                     args={"nesterov": nesterov, **with_momentum(0.95)}, device=device, precision=precision)
    except ValueError as e:  # torch's own check of a hyperparameter's range
        raise UserError(f"optimizer {name}: {e}") from None


def _muon(model, groups, *, lr, weight_decay, betas, eps, fused, args, device, precision) -> MuonWithAdamW:
    hidden = hidden_matrices(model)
    if not hidden:
        raise UserError("optimizer muon: the model has no hidden weight matrices (2-D Linear weights in its body); "
                        "choose another optimizer")
    # match_rms_adamw scales Muon's update to AdamW's RMS whatever the matrix shape, so the one
    # learning rate (and weight decay) tuned for AdamW serves both; muon_lr_scale departs from it.
    scale = args.pop("muon_lr_scale", 1.0)
    args.setdefault("adjust_lr_fn", "match_rms_adamw")
    # bf16 rounds the iteration's input at 3 digits: a run asked for fp32 (exact comparisons, e.g. one process
    # against several) keeps every digit, at about twice the iteration's cost on a CPU
    fast_bf16 = precision != "fp32" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()))
    muon = Muon([{"name": "muon", "params": hidden, "weight_decay": weight_decay, "lr_scale": scale}],
                lr=lr * scale, ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32, **args)
    adamw = torch.optim.AdamW(groups(exclude=hidden), lr=lr, betas=betas, eps=eps, fused=fused)
    return MuonWithAdamW(muon, adamw)
