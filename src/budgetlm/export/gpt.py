"""The GPT as a transformers decoder: Qwen3 with the SwiGLU MLP, Apertus with the ReLU² MLP.

Both compute what models/gpt.py computes: pre-norm blocks, RMSNorm in fp32 with the weight multiplied, per-head
RMSNorm on queries and keys before rotary, scores scaled by 1/√head_dim, no biases, tied embeddings. Their
rotary (rotate_half) pairs channel i with i + head_dim/2, as blocks.Rotary.rotate does, so q and k rows keep
their order."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from budgetlm.errors import UserError
from budgetlm.models.config import ModelConfig

EPS = 1e-6  # blocks.RMSNorm's, the only one the GPT uses
TEMPERATURE_KEY = "budgetlm_temperature"  # in the exported config.json, so import can unfold it


@dataclass(frozen=True)
class DecoderFamily:
    model_type: str     # transformers' config.json `model_type`
    architecture: str   # its causal-LM class
    mlp: str            # ModelConfig.mlp that maps onto it
    hidden_act: str
    attn_norm: str      # the layer's norm before attention, then before the MLP
    mlp_norm: str
    extra: tuple[tuple[str, object], ...] = ()  # config keys this family needs beyond the shared ones

    arch = "gpt"
    auto_class = "AutoModelForCausalLM"
    pipeline_tag = "text-generation"
    code_files = ()  # transformers has the code

    def hf_config(self, config: dict) -> dict:
        c = ModelConfig.from_dict(config)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.mlp_hidden,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_head,
            "head_dim": c.d_model // c.n_head, "hidden_act": self.hidden_act, "max_position_embeddings": c.context,
            "rms_norm_eps": EPS, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
            "rope_theta": c.rope_base,  # where transformers 4.x reads it
            "attention_bias": False, "tie_word_embeddings": True, "dtype": "float32", "use_cache": True,
            TEMPERATURE_KEY: c.temperature, **dict(self.extra),
        }

    def hf_weights(self, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        c = ModelConfig.from_dict(config)
        out = {theirs: state[ours][part] for ours, theirs, part in self._names(c)}
        # without a softcap the output head is linear, so dividing the final norm's weight divides the logits
        out["model.norm.weight"] = state["norm.weight"] / c.temperature
        return out

    def budgetlm_config(self, hf: dict) -> dict:
        """ModelConfig keys for a transformers config of this family; UserError where the GPT cannot hold it."""
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        mismatches = {
            "hidden_act": (hf.get("hidden_act"), self.hidden_act),
            "num_key_value_heads": (hf.get("num_key_value_heads") or heads, heads),
            "head_dim": (hf.get("head_dim") or d // heads, d // heads if d % heads == 0 else None),
            "tie_word_embeddings": (hf.get("tie_word_embeddings"), True),
            "attention_bias": (hf.get("attention_bias", False), False),
            "rms_norm_eps": (hf.get("rms_norm_eps"), EPS),
            "rope_type": (rope.get("rope_type", "default"), "default"),
            "final_logit_softcapping": (hf.get("final_logit_softcapping"), None),
            **{key: (hf.get(key, value), value) for key, value in self.extra},
        }
        for key, (found, needed) in mismatches.items():
            if found != needed:
                raise UserError(f"{self.model_type} with {key}={found!r}: budgetlm's GPT needs {needed!r}; only "
                                "models of the shape budgetlm exports can be imported")
        c = ModelConfig(vocab_size=hf["vocab_size"], context=hf["max_position_embeddings"],
                        n_layer=hf["num_hidden_layers"], n_head=heads, d_model=d, mlp=self.mlp,
                        mlp_ratio=hf["intermediate_size"] / d, dropout=0.0, attention_dropout=0.0, qk_norm=True,
                        rope_base=float(rope["rope_theta"]), logit_softcap=0.0, canon=0,
                        temperature=float(hf.get(TEMPERATURE_KEY, 1.0)))
        if c.mlp_hidden != hf["intermediate_size"]:
            raise UserError(f"intermediate_size {hf['intermediate_size']} is not a width budgetlm's mlp_ratio "
                            f"gives for hidden_size {d}")
        return c.to_dict()

    def budgetlm_weights(self, hf_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        c = ModelConfig.from_dict(config)
        parts: dict[str, list[torch.Tensor]] = {}
        for ours, theirs, _ in self._names(c):
            if theirs not in hf_state:
                raise UserError(f"the weights lack {theirs}")
            parts.setdefault(ours, []).append(hf_state[theirs])
        state = {ours: torch.cat(ps) if len(ps) > 1 else ps[0] for ours, ps in parts.items()}
        state["norm.weight"] = hf_state["model.norm.weight"] * c.temperature  # unfold what export folded
        return state

    def _names(self, c: ModelConfig):
        """(our name, transformers' name, our rows it holds) for every weight but the final norm's."""
        d, hidden, whole = c.d_model, c.mlp_hidden, slice(None)
        yield "embed.weight", "model.embed_tokens.weight", whole
        for i in range(c.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            for j, name in enumerate("qkv"):  # qkv stacks q, k and v
                yield ours + "attn.qkv.weight", theirs + f"self_attn.{name}_proj.weight", slice(j * d, (j + 1) * d)
            yield ours + "attn.proj.weight", theirs + "self_attn.o_proj.weight", whole
            yield ours + "attn.q_norm.weight", theirs + "self_attn.q_norm.weight", whole
            yield ours + "attn.k_norm.weight", theirs + "self_attn.k_norm.weight", whole
            yield ours + "attn_norm.weight", theirs + f"{self.attn_norm}.weight", whole
            yield ours + "mlp_norm.weight", theirs + f"{self.mlp_norm}.weight", whole
            if self.mlp == "swiglu":  # our up holds [gate; value], silu(gate)·value
                yield ours + "mlp.up.weight", theirs + "mlp.gate_proj.weight", slice(0, hidden)
                yield ours + "mlp.up.weight", theirs + "mlp.up_proj.weight", slice(hidden, 2 * hidden)
            else:
                yield ours + "mlp.up.weight", theirs + "mlp.up_proj.weight", whole
            yield ours + "mlp.down.weight", theirs + "mlp.down_proj.weight", whole


QWEN3 = DecoderFamily("qwen3", "Qwen3ForCausalLM", "swiglu", "silu", "input_layernorm", "post_attention_layernorm",
                      extra=(("use_sliding_window", False),))
APERTUS = DecoderFamily("apertus", "ApertusForCausalLM", "relu2", "relu2", "attention_layernorm",
                        "feedforward_layernorm")
FAMILIES = (QWEN3, APERTUS)


def family_for(config: dict) -> DecoderFamily | None:
    """The family a GPT's config exports to; None where no transformers family computes it: Canon layers (no
    family mixes earlier positions per channel), a logit softcap (the families with one differ elsewhere), no
    QK-norm (both families have it). Those go out as custom code (export/custom.py)."""
    c = ModelConfig.from_dict(config)
    if c.canon or c.logit_softcap or not c.qk_norm:
        return None
    return next(f for f in FAMILIES if f.mlp == c.mlp)
