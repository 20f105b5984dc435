"""The guides' baseline classifier body: Embedding(vocab → 64) → LSTM(128), over a word-level
vocabulary (the training split's most frequent lowercased words)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD, UNK = "[PAD]", "[UNK]"
WORD = r"\w+(?:'\w+)?|[^\w\s]"  # words (with an inner apostrophe: don't, it's) and single punctuation marks


def word_tokenizer(texts: list[str], vocab_words: int = 20000) -> Tokenizer:
    """A word-level tokenizer whose vocabulary is the `vocab_words` most frequent lowercased words of
    `texts`, plus [PAD] (id 0) and [UNK] (id 1). Hugging Face `tokenizers` does the counting and
    saves the vocabulary as JSON inside tokenizer.json."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD), behavior="removed", invert=True)  # keep the matches
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_words + 2, special_tokens=[PAD, UNK], min_frequency=1,
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


@dataclass
class LSTMConfig:
    vocab_size: int
    embed_dim: int = 64
    hidden: int = 128
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMEncoder(nn.Module):
    """Hidden states (batch, time, hidden) of a one-layer LSTM. Rows are packed to their true
    lengths, so padding never enters the recurrence and `last` pooling reads the final state."""

    kind = "lstm"

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_id)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden, batch_first=True)
        self.width = config.hidden
        self.max_length = None  # any length
        self.pad_id = config.pad_id

    @classmethod
    def from_config(cls, config: dict) -> LSTMEncoder:
        return cls(LSTMConfig(**{k: v for k, v in config.items() if k in LSTMConfig.__dataclass_fields__}))

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return out

    def token_embedding(self) -> nn.Module:
        return self.embed

    def layers(self) -> list[list[nn.Parameter]]:
        return [list(self.embed.parameters()), list(self.lstm.parameters())]
