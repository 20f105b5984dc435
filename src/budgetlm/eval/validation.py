"""How a run's metrics.jsonl tells its evaluations apart: those during training score a fixed sample
of the validation set (`val_sample_tokens` or `val_sample_examples`, with standard errors `val_*_se`)
or all of it (`val_full: true`); the one `kind: final` record is the kept weights on the whole set,
with the figures the run reports. The plots label them with these."""

from __future__ import annotations


def final_record(records: list[dict]) -> dict | None:
    """The run's final evaluation (the kept weights on the whole validation set), if it had one."""
    return next((r for r in reversed(records) if r.get("kind") == "final"), None)


def validation_label(evals: list[dict]) -> str:
    """What the periodic evaluations scored: a fixed sample, or the whole validation set."""
    sample = next((r for r in evals if r.get("val_sample_tokens") or r.get("val_sample_examples")), None)
    if sample is None:
        return "validation (whole set)"
    size = (f"{sample['val_sample_tokens']:,} tokens" if sample.get("val_sample_tokens")
            else f"{sample['val_sample_examples']:,} examples")
    return f"validation (fixed sample of {size})"


def final_label(final: dict) -> str:
    """The final evaluation's legend entry, with the figures the run reports."""
    figures = [f"loss {final['val_loss']:.4f}"]
    if final.get("val_bpb") is not None:
        figures.append(f"{final['val_bpb']:.4f} bits/byte")
    if final.get("val_accuracy") is not None:
        figures.append(f"accuracy {final['val_accuracy']:.4f}")
    return "final, whole validation set: " + ", ".join(figures)
