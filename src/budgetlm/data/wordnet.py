"""Synonyms for text augmentation: from WordNet's database files, NLTK's WordNet, or a JSON file.

Without a tagger we cannot tell which sense a word has in a sentence, so a word's synonyms come from
one part of speech only: the one in which WordNet lists the most senses for it (its commonest use;
ties go noun, verb, adjective, adverb). "run" thus gets verb synonyms and never a mix with the noun's.
Words are looked up as written (lower-cased), without lemmatising."""

from __future__ import annotations

import json
import re
from pathlib import Path

from budgetlm.errors import UserError

DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
POS_ORDER = tuple(DATA_FILES)  # tie-break order when a word has as many senses in two parts of speech
SYSTEM_WORDNET = Path("/usr/share/wordnet")  # Debian/Ubuntu package wordnet-base
HOW_TO_GET_ONE = ("install WordNet (apt-get install wordnet-base) or give --synonyms words.json, "
                  "a JSON object mapping each word to a list of its synonyms")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # syntactic markers on adjectives, e.g. galore(ip)


def clean_lemma(word: str) -> str:
    """A WordNet lemma as text: no adjective marker, spaces for underscores."""
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def _distinct_others(word: str, candidates) -> list[str]:
    """`candidates` in order, without repeats and without `word` itself (ignoring case)."""
    seen = {word.lower()}
    out = []
    for c in candidates:
        if c and c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
    return out


def _pick_pos(senses: dict[str, list]) -> list:
    """The senses of the part of speech with the most of them (first in POS_ORDER on a tie)."""
    return max((senses.get(pos, []) for pos in POS_ORDER), key=len)


def parse_data_line(line: str) -> tuple[str, list[str]] | None:
    """(part of speech, words) of one synset line of a WordNet data file, or None for the license
    header (its lines start with two spaces). Satellite adjectives (type s) count as adjectives.
    Line format (wndb(5)): offset lex_filenum ss_type w_cnt(2 hex digits) word lex_id [word lex_id ...] ..."""
    if line.startswith("  ") or not line.strip():
        return None
    fields = line.split(" ")
    if len(fields) < 6 or fields[2] not in ("n", "v", "a", "s", "r"):
        raise ValueError("not a WordNet synset line")
    count = int(fields[3], 16)
    pos = "a" if fields[2] == "s" else fields[2]
    return pos, [clean_lemma(w) for w in fields[4:4 + 2 * count:2]]


class WordNet:
    """Synonyms from the WordNet 3.0 database files (data.noun, data.verb, data.adj, data.adv) in a folder.
    Read directly so no extra package is needed: the format is fixed and a line is split in one call."""

    def __init__(self, folder: str | Path):
        self.source = str(folder)
        self._synsets: list[list[str]] = []
        self._senses: dict[str, dict[str, list[int]]] = {}  # lemma → part of speech → synset numbers
        folder = Path(folder)
        missing = [name for name in DATA_FILES.values() if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder}: not a WordNet database folder (missing {', '.join(missing)}); {HOW_TO_GET_ONE}")
        for name in DATA_FILES.values():
            self._read(folder / name)

    def _read(self, path: Path) -> None:
        with path.open(encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    parsed = parse_data_line(line)
                except ValueError:
                    raise UserError(f"{path}:{n}: not a WordNet 3.0 data line; point --synonyms at a WordNet "
                                    "database folder") from None
                if parsed is None:
                    continue
                pos, words = parsed
                number = len(self._synsets)
                self._synsets.append(words)
                for word in words:
                    self._senses.setdefault(word.lower(), {}).setdefault(pos, []).append(number)

    def __call__(self, word: str) -> list[str]:
        synsets = _pick_pos(self._senses.get(word.lower(), {}))
        return _distinct_others(word, (w for number in synsets for w in self._synsets[number]))


class NltkWordNet:
    """Synonyms through NLTK's WordNet reader (which also finds base forms: "movies" → "movie")."""

    source = "nltk"

    def __init__(self, reader):
        self._reader = reader

    def __call__(self, word: str) -> list[str]:
        senses: dict[str, list] = {}
        for synset in self._reader.synsets(word):
            pos = "a" if synset.pos() == "s" else synset.pos()
            senses.setdefault(pos, []).append(synset)
        lemmas = (clean_lemma(name) for synset in _pick_pos(senses) for name in synset.lemma_names())
        return _distinct_others(word, lemmas)


class SynonymTable:
    """Synonyms from a mapping of words (matched ignoring case) to lists of synonyms."""

    def __init__(self, table: dict[str, list[str]], source: str = "table"):
        self.source = source
        self._table = {word.lower(): list(synonyms) for word, synonyms in table.items()}

    @classmethod
    def from_json(cls, path: str | Path) -> SynonymTable:
        try:
            table = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a JSON file ({e}); --synonyms takes an object mapping words to "
                            "lists of synonyms") from None
        if not isinstance(table, dict) or not all(
                isinstance(s, list) and all(isinstance(x, str) for x in s) for s in table.values()):
            raise UserError(f'{path}: --synonyms needs a JSON object mapping each word to a list of strings, '
                            'e.g. {"good": ["fine", "great"]}')
        return cls(table, source=str(path))

    def __call__(self, word: str) -> list[str]:
        return _distinct_others(word, self._table.get(word.lower(), []))


def _nltk_wordnet() -> NltkWordNet | None:
    """NLTK's WordNet when nltk is installed and its wordnet data is downloaded, else None."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()  # raises LookupError when the data is not downloaded
    except (ImportError, LookupError, OSError):
        return None
    return NltkWordNet(wordnet)


def load_synonyms(path: str | Path | None = None, *, system_folder: Path = SYSTEM_WORDNET):
    """A callable word → synonyms. Sources in order: `path` (a WordNet database folder or a JSON file),
    NLTK's WordNet, the system's WordNet folder (apt-get install wordnet-base)."""
    if path is not None:
        path = Path(path)
        if path.is_dir():
            return WordNet(path)
        if path.is_file() and path.suffix.lower() == ".json":
            return SynonymTable.from_json(path)
        if not path.exists():
            raise UserError(f"{path}: no such file or folder; --synonyms takes a WordNet folder or a JSON file")
        raise UserError(f"{path}: --synonyms takes a WordNet database folder or a .json file")
    if (nltk := _nltk_wordnet()) is not None:
        return nltk
    if (system_folder / DATA_FILES["n"]).is_file():
        return WordNet(system_folder)
    raise UserError(f"synonym replacement and insertion need a thesaurus and none was found: {HOW_TO_GET_ONE}")
