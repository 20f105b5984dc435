"""EDA, easy data augmentation for text classification (Wei & Zou, 2019): synonym replacement (sr),
random insertion (ri), random swap (rs) and random deletion (rd).

Each augmented copy applies one operation; the enabled operations take turns. Words are the text's
whitespace-separated tokens. Augment the training split only: copies of validation examples would
leak into training and inflate the validation score."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from budgetlm.errors import UserError

Synonyms = Callable[[str], list[str]]  # word → its synonyms, never the word itself
OPERATIONS = ("sr", "ri", "rs", "rd")
DEFAULT_SPEC = "sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4"  # the paper's α = 0.1; n = 4 suits datasets of 5,000+ examples


@dataclass(frozen=True)
class AugmentConfig:
    """Rates α of the four operations (0 switches one off) and `n`, the augmented copies per example."""

    sr: float = 0.0
    ri: float = 0.0
    rs: float = 0.0
    rd: float = 0.0
    n: int = 4

    def __post_init__(self):
        for name in OPERATIONS:
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise UserError(f"augment: {name}={value} is outside [0, 1]; rates are fractions of the words")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise UserError(f"augment: n={self.n} must be a whole number of copies, 0 or more")

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(name for name in OPERATIONS if getattr(self, name) > 0)

    @property
    def enabled(self) -> bool:
        return self.n > 0 and bool(self.operations)

    @property
    def needs_synonyms(self) -> bool:
        return self.enabled and (self.sr > 0 or self.ri > 0)

    def to_spec(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


def parse_augment_spec(text: str) -> AugmentConfig:
    """`sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4` → AugmentConfig. Operations left out are off; n defaults to 4."""
    values: dict[str, float | int] = {}
    keys = (*OPERATIONS, "n")
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(f"augment: {item!r} is not key=value; e.g. --augment {DEFAULT_SPEC}")
        if key not in keys:
            raise UserError(f"augment: unknown key {key!r}; use {', '.join(keys)} (e.g. {DEFAULT_SPEC})")
        if key in values:
            raise UserError(f"augment: {key} is given twice")
        try:
            values[key] = int(value) if key == "n" else float(value)
        except ValueError:
            kind = "a whole number" if key == "n" else "a number in [0, 1]"
            raise UserError(f"augment: {key}={value!r} is not {kind}") from None
    return AugmentConfig(**values)


def _replaceable(word: str) -> bool:
    return word.isalpha() and word.lower() not in ENGLISH_STOP_WORDS


def _synonyms_of(word: str, synonyms: Synonyms) -> list[str]:
    if not _replaceable(word):
        return []
    return [s for s in synonyms(word) if s.lower() not in ENGLISH_STOP_WORDS]


def _like(synonym: str, word: str) -> str:
    """The synonym capitalised when the word it replaces was (e.g. at the start of a sentence)."""
    return synonym[:1].upper() + synonym[1:] if word[:1].isupper() else synonym


def _count(alpha: float, n_words: int) -> int:
    return max(1, round(alpha * n_words))


def synonym_replacement(words: list[str], alpha: float, synonyms: Synonyms, rng: random.Random) -> list[str]:
    """Replace n = max(1, round(α·len)) non-stopwords that have synonyms, each by a random synonym."""
    out = list(words)
    options = {i: s for i, w in enumerate(words) if (s := _synonyms_of(w, synonyms))}
    positions = sorted(options)
    rng.shuffle(positions)
    for i in positions[:_count(alpha, len(words))]:
        out[i] = _like(rng.choice(options[i]), words[i])
    return out


def random_insertion(words: list[str], alpha: float, synonyms: Synonyms, rng: random.Random) -> list[str]:
    """n times: insert a synonym of a random non-stopword of the sentence at a random position.
    A multi-word synonym counts as one insertion."""
    out = list(words)
    options = [s for w in words if (s := _synonyms_of(w, synonyms))]
    if not options:
        return out
    for _ in range(_count(alpha, len(words))):
        out.insert(rng.randint(0, len(out)), rng.choice(rng.choice(options)))
    return out


def random_swap(words: list[str], alpha: float, rng: random.Random) -> list[str]:
    """n times: swap two words at distinct random positions."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(_count(alpha, len(words))):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability p; one random word survives if all would go."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def augment_copies(text: str, cfg: AugmentConfig, synonyms: Synonyms | None, seed: int, index: int) -> list[str]:
    """The `cfg.n` augmented copies of example `index`. Copy j draws from its own RNG seeded by
    (seed, index, j), so the result does not depend on which other examples are augmented or in what order."""
    if not cfg.enabled:
        return []
    if cfg.needs_synonyms and synonyms is None:
        raise ValueError("synonym replacement or insertion is on but no synonyms were given")
    words = text.split()
    ops = cfg.operations
    copies = []
    for j in range(cfg.n):
        rng = random.Random(f"{seed}/{index}/{j}")  # str seeds hash with SHA-512: stable across runs
        op = ops[(index + j) % len(ops)]  # turns start at a different operation per example
        if op == "sr":
            new = synonym_replacement(words, cfg.sr, synonyms, rng)
        elif op == "ri":
            new = random_insertion(words, cfg.ri, synonyms, rng)
        elif op == "rs":
            new = random_swap(words, cfg.rs, rng)
        else:
            new = random_deletion(words, cfg.rd, rng)
        copies.append(" ".join(new))
    return copies


def augment_dataset(texts: list[str], labels: list, cfg: AugmentConfig, synonyms: Synonyms | None,
                    seed: int) -> tuple[list[str], list]:
    """Each example followed by its `cfg.n` augmented copies, which carry its label.
    Pass only the training split (see the module docstring). `synonyms` may be None when sr and ri are off."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    out_texts, out_labels = [], []
    for i, (text, label) in enumerate(zip(texts, labels)):
        copies = augment_copies(text, cfg, synonyms, seed, i)
        out_texts += [text, *copies]
        out_labels += [label] * (1 + len(copies))
    return out_texts, out_labels
