"""Evaluation metrics shared by the workstation and the device. Torch-free (numpy arrays)."""

from __future__ import annotations


def classification_metrics(confusion) -> dict:
    """confusion[true, pred] -> accuracy and macro-F1 (classes absent from both count as F1 0)."""
    tp = confusion.diagonal()
    total = confusion.sum()
    precision_den = confusion.sum(0)
    recall_den = confusion.sum(1)
    f1 = [2 * t / (p + r) if p + r > 0 else 0.0 for t, p, r in zip(tp, precision_den, recall_den)]
    return {"accuracy": float(tp.sum() / total) if total else 0.0, "macro_f1": float(sum(f1) / len(f1)) if f1 else 0.0}
