"""budgetlm's Transformer body for transformers (trust_remote_code): the BERT (masked LM), the T5 (encoder-decoder)
and the GPT (causal LM) that budgetlm trains, read from the weights it saves, under its own weight names.

No transformers family computes this body (RMSNorm, half-split rotary, per-head RMSNorm on queries and keys, ReLU²
or SwiGLU MLP, no biases, a tied head, optional Canon mixes), hence this small reimplementation. It depends on
torch and transformers only. It is written for inference and fine-tuning without dropout, and keeps no key/value
cache: `generate` recomputes the decoder's tokens at each step (a T5's encoder runs once)."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput, MaskedLMOutput, Seq2SeqLMOutput

from .configuration_budgetlm import BudgetLMConfig

EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, EPS)


def rotary_tables(config, length, device):
    """cos and sin of each position's angles, (time, 1, head_dim/2): position p turns channel pair i by
    p / base^(2i/head_dim)."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[:, None], angles.sin()[:, None]


def rotate(x, cos, sin):
    """x (batch, time, heads, head_dim): channel i turns with channel i + head_dim/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Canon(nn.Module):
    """x_t + Σ_j w_j ⊙ x_(t-j), j = 0 … kernel-1: each position mixed with the few before it, per channel."""

    def __init__(self, kernel, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(kernel, dim))

    def forward(self, x):
        w = self.weight
        out = x + x * w[0]
        for j in range(1, min(len(w), x.shape[1])):
            out = out + F.pad(x[:, :-j], (0, 0, j, 0)) * w[j]
        return out


class Attention(nn.Module):
    """Self-attention over x (one qkv matrix), or cross-attention from x to the encoder's memory (q, then kv)."""

    def __init__(self, config, cross=False):
        super().__init__()
        d = config.d_model
        self.n_head, self.head_dim = config.n_head, config.head_dim
        if cross:
            self.q = nn.Linear(d, d, bias=False)
            self.kv = nn.Linear(d, 2 * d, bias=False)
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x, mask=None, rope=None, memory=None):
        """mask: boolean, True where a query may read a key, broadcast to (batch, heads, queries, keys)."""
        b, t, d = x.shape
        h, hd = self.n_head, self.head_dim
        if memory is None:
            q, k, v = self.qkv(x).view(b, t, 3 * h, hd).split(h, dim=2)
        else:
            q = self.q(x).view(b, t, h, hd)
            k, v = self.kv(memory).view(b, memory.shape[1], 2 * h, hd).split(h, dim=2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, self.kind = config.mlp_hidden, config.mlp
        self.up = nn.Linear(config.d_model, hidden * (2 if self.kind == "swiglu" else 1), bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        h = self.up(x)
        if self.kind == "swiglu":  # up holds [gate; value]
            gate, value = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        return self.down(F.relu(h).square())


class Block(nn.Module):
    """Pre-norm: x + attention(norm(x)), [x + cross-attention(norm(x))], x + MLP(norm(x)); with Canon, the
    attention's and the MLP's normalized inputs are mixed first."""

    def __init__(self, config, cross=False, canon=0):
        super().__init__()
        self.canon = canon
        if canon:
            self.canon_attn, self.canon_mlp = Canon(canon, config.d_model), Canon(canon, config.d_model)
        self.attn_norm, self.attn = RMSNorm(config.d_model), Attention(config)
        if cross:
            self.cross_norm, self.cross = RMSNorm(config.d_model), Attention(config, cross=True)
        self.has_cross = cross
        self.mlp_norm, self.mlp = RMSNorm(config.d_model), MLP(config)

    def forward(self, x, mask, rope, memory=None, memory_mask=None):
        h = self.attn_norm(x)
        x = x + self.attn(self.canon_attn(h) if self.canon else h, mask=mask, rope=rope)
        if self.has_cross:
            x = x + self.cross(self.cross_norm(x), mask=memory_mask, memory=memory)
        h = self.mlp_norm(x)
        return x + self.mlp(self.canon_mlp(h) if self.canon else h)


class Stack(nn.ModuleList):
    """A T5's encoder or decoder blocks (budgetlm's weight names: encoder.N..., decoder.N...)."""

    main_input_name = "input_ids"  # generate reads it from the model's `encoder` attribute


def key_mask(attention_mask):
    """(batch, time) with 1 on real tokens → (batch, 1, 1, time): padding keys are not read."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def causal_mask(length, attention_mask, device):
    """Each position reads itself and the ones before it, never padding (except itself, so no row is empty)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return mask
    return (mask & key_mask(attention_mask)) | torch.eye(length, dtype=torch.bool, device=device)


class BudgetLMPreTrainedModel(PreTrainedModel):
    config_class = BudgetLMConfig
    base_model_prefix = "budgetlm"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        """budgetlm's init (normal, std 0.02; norms at one; Canon mixes at zero), for weights a checkpoint lacks."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Canon):
            nn.init.zeros_(module.weight)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def stack(self, blocks, ids, mask, memory=None, memory_mask=None):
        """The blocks over the embedded ids (rotary positions from 0)."""
        x = self.embed(ids)
        rope = rotary_tables(self.config, ids.shape[1], ids.device)
        rope = tuple(r.to(x.dtype) for r in rope)
        for block in blocks:
            x = block(x, mask, rope, memory, memory_mask)
        return x

    def head(self, h):
        return F.linear(h, self.embed.weight)  # tied input/output embedding


def _loss(logits, labels):
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)


class BudgetLMForMaskedLM(BudgetLMPreTrainedModel):
    """budgetlm's BERT: a bidirectional encoder whose tied head predicts the masked tokens."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        h = self.norm(self.stack(self.blocks, input_ids, key_mask(attention_mask)))
        logits = self.head(h)
        return MaskedLMOutput(loss=None if labels is None else _loss(logits, labels), logits=logits)


class BudgetLMForCausalLM(BudgetLMPreTrainedModel, GenerationMixin):
    """budgetlm's GPT, Canon mixes, logit softcap and fitted temperature included."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, canon=config.canon) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        mask = causal_mask(input_ids.shape[1], attention_mask, input_ids.device)
        h = self.norm(self.stack(self.blocks, input_ids, mask))
        cap, temperature = self.config.logit_softcap, self.config.budgetlm_temperature
        if cap:
            logits = cap * torch.tanh(self.head(h) / cap) / temperature
        else:  # the head is linear: dividing its input divides the logits, as budgetlm computes it
            logits = self.head(h * (1 / temperature))
        loss = None if labels is None else _loss(logits[:, :-1], labels[:, 1:])  # each position predicts the next
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole sequence: no cache


class _Encoder(nn.Module):
    """A T5's encoder as a module of its own, for `generate`, which runs it once. It holds the model without
    registering it, so the weights stay the model's (saved once, moved with it)."""

    main_input_name = "input_ids"

    def __init__(self, model):
        super().__init__()
        self.__dict__["model"] = model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, attention_mask))


class BudgetLMForSeq2SeqLM(BudgetLMPreTrainedModel, GenerationMixin):
    """budgetlm's T5: a bidirectional encoder and a causal decoder that also reads the encoder's output, one tied
    embedding for both and for the head. The decoder starts from `decoder_start_token_id` ([PAD])."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(Block(config) for _ in range(config.n_layer))
        self.encoder_norm = RMSNorm(config.d_model)
        self.decoder = Stack(Block(config, cross=True) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model)
        self.post_init()

    def get_encoder(self):
        return _Encoder(self)

    def encode(self, input_ids, attention_mask=None):
        return self.encoder_norm(self.stack(self.encoder, input_ids, key_mask(attention_mask)))

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                labels=None, **kwargs):
        if encoder_outputs is None:
            encoder_outputs = BaseModelOutput(last_hidden_state=self.encode(input_ids, attention_mask))
        memory = encoder_outputs[0]
        if decoder_input_ids is None:  # teacher forcing: the start token, then the labels shifted right
            start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
            decoder_input_ids = torch.cat((start, labels[:, :-1]), dim=1)
            decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, self.config.pad_token_id)
        mask = causal_mask(decoder_input_ids.shape[1], None, decoder_input_ids.device)
        h = self.norm(self.stack(self.decoder, decoder_input_ids, mask, memory, key_mask(attention_mask)))
        logits = self.head(h)
        return Seq2SeqLMOutput(loss=None if labels is None else _loss(logits, labels), logits=logits,
                               encoder_last_hidden_state=memory)

    def prepare_inputs_for_generation(self, decoder_input_ids, attention_mask=None, encoder_outputs=None,
                                      **kwargs):
        return {"decoder_input_ids": decoder_input_ids, "attention_mask": attention_mask,
                "encoder_outputs": encoder_outputs}  # the whole decoder sequence: no cache
