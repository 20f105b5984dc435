"""Classification scores with scikit-learn, and the plots a fine-tuning run leaves behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from budgetlm.eval.validation import final_label, final_record, validation_label


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in either array (a subset may lack some)."""
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-probability of the true class (nats), each probability floored at 1e-12."""
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(y_true)), y_true], 1e-12))))


def report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted), every class of `labels` included."""
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "per_class": {label: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                              "f1": round(float(f1[i]), 6), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "confusion": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    }


def load_plotting() -> None:
    """Import what the plots need now, so that the time it takes comes before training, not after
    the time kept for the end of a budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    from sklearn.metrics import ConfusionMatrixDisplay  # noqa: F401


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(4 + 0.45 * len(labels), 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=labels).plot(
        ax=ax, colorbar=False, cmap="Blues", include_values=len(labels) <= 30)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(records: list[dict], path: Path, title: str = "") -> None:
    """Train and validation loss, and validation accuracy, against training examples; the final
    evaluation of the kept weights on the whole validation set is a labelled star at the end."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("train_loss") is not None]
    val = [r for r in records if r.get("val_loss") is not None and r.get("kind") != "final"]
    final = final_record(records)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_ax.plot([r["examples"] for r in train], [r["train_loss"] for r in train], label="train", lw=1, alpha=0.8)
    if val:
        loss_ax.plot([r["examples"] for r in val], [r["val_loss"] for r in val], "o-", label=validation_label(val),
                     ms=3)
        acc_ax.plot([r["examples"] for r in val], [r["val_accuracy"] for r in val], "o-", ms=3, label="accuracy")
        acc_ax.plot([r["examples"] for r in val], [r["val_macro_f1"] for r in val], "s--", ms=3, label="macro-F1")
    if final is not None:
        loss_ax.plot([final["examples"]], [final["val_loss"]], "*", ms=13, color="C3", label=final_label(final))
        acc_ax.plot([final["examples"]], [final["val_accuracy"]], "*", ms=13, color="C3",
                    label=f"final accuracy, whole set: {final['val_accuracy']:.4f}")
    loss_ax.set_ylabel("loss (nats per example)")
    acc_ax.set_ylabel("validation score")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("training examples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
