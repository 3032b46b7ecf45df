"""Plots of a model's evaluation: training curves and the confusion matrix, as PNG bytes.

Used by `train.py` (files in the report folder) and by the app's model card (from the metrics
stored in the registry), so both show the same figures. Drawn with matplotlib's object API on
the Agg canvas: pyplot's global state is not thread-safe, and the server answers in threads.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def confusion_png(matrix: list[list[int]], class_names: list[str], accuracy: float) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    matrix = np.asarray(matrix)
    figure = Figure(figsize=(7, 6))
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix, accuracy {accuracy * 100:.2f} %")
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        axis.text(col, row, str(value), ha="center", va="center", fontsize=7, color=color)
    return _png(figure)


def curves_png(history: dict[str, list[float]]) -> bytes:
    """Loss and accuracy per epoch, training and validation side by side."""
    figure = Figure(figsize=(11, 4))
    loss_axis, acc_axis = figure.subplots(1, 2)
    epochs = range(1, len(history["loss"]) + 1)
    for axis, metric in ((loss_axis, "loss"), (acc_axis, "accuracy")):
        for key, label in ((metric, "training"), (f"val_{metric}", "validation")):
            if key in history:
                axis.plot(epochs, history[key], marker="o", label=label)
        axis.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    return _png(figure)


def reliability_png(before: list[dict], after: list[dict], split: str) -> bytes:
    """Reliability diagram: accuracy against mean confidence per bin, before and after calibration."""
    figure = Figure(figsize=(5.5, 5))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for rows, label, marker in ((before, "before", "s"), (after, "after", "o")):
        used = [row for row in rows if row["count"]]
        axis.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], marker=marker, label=label)
    axis.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability ({split} split)")
    axis.legend()
    return _png(figure)


def risk_coverage_png(curve: dict, target_accuracy: float, split: str) -> bytes:
    """Risk (error rate) of the most confident answers against the share answered."""
    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    axis.plot(curve["coverage"], curve["risk"], marker=".")
    axis.axhline(1 - target_accuracy, linestyle="--", color="grey", label=f"{target_accuracy * 100:.0f} % accuracy")
    axis.set(xlabel="coverage", ylabel="risk (error rate)", xlim=(0, 1), title=f"Risk-coverage ({split} split)")
    axis.legend()
    return _png(figure)


def drift_png(windows: list[dict]) -> bytes:
    """A model version's drift over its windows: estimated accuracy (± 3 SE) against the
    reference's, the unknown rate, and the smallest test p-value, with alerts marked."""
    figure = Figure(figsize=(10, 6.5))
    accuracy_axis, unknown_axis, p_axis = figure.subplots(3, 1, sharex=True)
    x = np.arange(1, len(windows) + 1)
    value = np.array([w["estimated_accuracy"] for w in windows])
    spread = 3 * np.array([w["estimated_accuracy_se"] for w in windows])
    accuracy_axis.fill_between(x, value - spread, value + spread, alpha=0.2, label="± 3 SE")
    accuracy_axis.plot(x, value, marker="o", label="estimated accuracy")
    accuracy_axis.plot(x, [w["reference_accuracy"] for w in windows], "k--", label="reference")
    hurt = [i for i, w in enumerate(windows) if "model" in w["alerts"]]
    accuracy_axis.plot(x[hurt], value[hurt], "rx", markersize=10, label="model likely hurt")
    accuracy_axis.set(ylabel="estimated accuracy", title="Drift by window of predictions")
    accuracy_axis.legend(loc="lower left", fontsize=8)
    unknown_axis.plot(x, [w["unknown_rate"] for w in windows], marker="o", color="tab:orange")
    unknown_axis.set(ylabel="unknown rate")
    p_values = np.clip([w["min_p_value"] for w in windows], 1e-300, 1)
    p_axis.semilogy(x, p_values, marker="o", color="tab:purple")
    drifted = [i for i, w in enumerate(windows) if {"input", "prediction"} & set(w["alerts"])]
    p_axis.semilogy(x[drifted], p_values[drifted], "rx", markersize=10, label="drift alert")
    p_axis.set(ylabel="smallest p-value", xlabel="window (oldest first)")
    if drifted:
        p_axis.legend(loc="lower left", fontsize=8)
    for axis in (accuracy_axis, unknown_axis, p_axis):
        axis.grid(alpha=0.3)
    return _png(figure)
