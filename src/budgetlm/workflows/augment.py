"""`budgetlm augment`: write a labelled table with EDA copies of every row after the row itself.

Give it the training split only; augmenting validation data would make its scores meaningless."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from budgetlm.data.augment import DEFAULT_SPEC, augment_copies, parse_augment_spec
from budgetlm.data.labelled import find_columns, labelled_from_rows, read_rows, write_rows
from budgetlm.data.wordnet import load_synonyms
from budgetlm.errors import UserError


def run(src: str | Path, dst: str | Path, *, text_column: str | None = None, label_column: str | None = None,
        header: bool = True, spec: str = DEFAULT_SPEC, seed: int = 0, synonyms: str | None = None) -> dict:
    started = time.monotonic()
    src, dst = Path(src), Path(dst)
    cfg = parse_augment_spec(spec)
    if not cfg.enabled:
        raise UserError(f"--augment {spec!r} switches every operation off; e.g. --augment {DEFAULT_SPEC}")
    if src.suffix.lower() != dst.suffix.lower():
        raise UserError(f"{dst}: write the same format as the input ({src.suffix}); give OUT a {src.suffix} name")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"{dst}: OUT is the input file; choose another name so the original is kept")
    columns, rows = read_rows(src, header)
    if rows:
        text_column, label_column = find_columns(src, columns, rows, text_column, label_column, header)
    texts, _, _ = labelled_from_rows(src, columns, rows, text_column, label_column)
    thesaurus = load_synonyms(synonyms) if cfg.needs_synonyms else None
    out_rows = []
    for i, row in enumerate(rows):
        out_rows.append(row)
        out_rows += [{**row, text_column: copy} for copy in augment_copies(texts[i], cfg, thesaurus, seed, i)]
    write_rows(dst, columns, out_rows, header)
    seconds = time.monotonic() - started
    print(f"augment: {len(rows)} rows → {len(out_rows)} in {dst} ({cfg.to_spec()}, {seconds:.1f}s)",
          file=sys.stderr, flush=True)
    return {"input": str(src), "output": str(dst), "rows_in": len(rows), "rows_out": len(out_rows),
            "augment": cfg.to_spec(), "seed": seed, "synonyms": getattr(thesaurus, "source", None),
            "seconds": round(seconds, 2)}
