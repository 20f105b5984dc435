"""The config of a budgetlm model exported for transformers (trust_remote_code). Its fields are budgetlm's own
model config (config.json of a budgetlm run), so `budgetlm import` reads them back as they are; transformers'
standard names (hidden_size, num_hidden_layers, ...) are aliases of them. Depends on transformers only."""

from transformers import PretrainedConfig


class BudgetLMConfig(PretrainedConfig):
    model_type = "budgetlm"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "max_position_embeddings": "context"}

    def __init__(self, arch="gpt", vocab_size=256, context=256, n_layer=2, n_head=2, d_model=128, mlp="relu2",
                 mlp_ratio=4.0, qk_norm=True, rope_base=10000.0, logit_softcap=0.0, canon=0, budgetlm_temperature=1.0,
                 dropout=0.0, attention_dropout=0.0, **kwargs):
        """arch: "bert" (encoder, masked LM), "t5" (encoder-decoder) or "gpt" (decoder); budgetlm_temperature: the
        GPT's fitted logit temperature. Dropout rates are kept for the round trip back to budgetlm; the modeling
        code applies none."""
        self.arch, self.vocab_size, self.context = arch, vocab_size, context
        self.n_layer, self.n_head, self.d_model = n_layer, n_head, d_model
        self.mlp, self.mlp_ratio, self.qk_norm, self.rope_base = mlp, mlp_ratio, qk_norm, rope_base
        self.logit_softcap, self.canon = logit_softcap, canon
        self.budgetlm_temperature = budgetlm_temperature  # not `temperature`: generate reads that name
        self.dropout, self.attention_dropout = dropout, attention_dropout
        kwargs.setdefault("is_encoder_decoder", arch == "t5")
        kwargs.setdefault("tie_word_embeddings", False)  # the head reads the embedding itself: nothing to tie
        super().__init__(**kwargs)

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head
