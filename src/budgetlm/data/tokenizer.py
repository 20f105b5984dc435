"""Byte-level BPE tokenizers trained with Hugging Face `tokenizers` (any UTF-8 text round-trips)."""

from __future__ import annotations

import math
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from budgetlm.errors import UserError

EOT = "<|endoftext|>"  # separates documents; id 0
# BERT's special tokens and T5's sentinels (which stand for the dropped spans, in order)
MASK, CLS, SEP, PAD = "[MASK]", "[CLS]", "[SEP]", "[PAD]"
SENTINELS = 100  # as T5's vocabulary: more than the spans of the longest planned window (1024 tokens: 51)


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens(arch: str) -> list[str]:
    """The special tokens an architecture's objective needs beyond the document separator."""
    if arch == "bert":
        return [MASK, CLS, SEP, PAD]
    if arch == "t5":
        return [PAD, *(sentinel(i) for i in range(SENTINELS))]
    return []


def with_special_tokens(tok: Tokenizer, arch: str) -> Tokenizer:
    """`tok` with `arch`'s special tokens added after its vocabulary (those it lacks), so the BPE merges and the
    ids of ordinary text stay those of the plain tokenizer; they are saved with it in tokenizer.json."""
    missing = [t for t in special_tokens(arch) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok


def default_vocab_size(n_bytes: int) -> int:
    """A power of two near 4·sqrt(corpus bytes), in [512, 32768]: 4k for 1 MB, 8k for 4 MB.
    Small corpora cannot fill a large vocabulary with well-trained embeddings. Measured: on
    tinyshakespeare (1 MB, 5 minutes) 4,096 beat 2,048 in three seeds; on the SST-2 sentences
    (3.7 MB) 8,192 kept the fine-tuned accuracy, 16,384 lost 1 point (docs/planner.md)."""
    guess = 2 ** round(math.log2(max(4 * math.sqrt(max(n_bytes, 1)), 1)))
    return int(min(max(guess, 512), 32768))


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 257 + 1:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no tokenizer file; give a tokenizer.json saved by budgetlm or Hugging Face tokenizers")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception subclass with a parse message
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    return tok


def eot_id(tok: Tokenizer) -> int:
    """The document separator's id; tokenizers from elsewhere may lack it, then 0 is used."""
    found = tok.token_to_id(EOT)
    return 0 if found is None else found
