"""The model card beside a model file, summarised as text for the GUI (no torch import, no model load)."""

from __future__ import annotations

import os

from .dependencies import MODULE_DIR

SHIPPED_MODEL_PATH = os.path.join(MODULE_DIR, "refnet", "weights", "refnet_phantom.pt")


def modelCardPath(modelPath: str | None) -> str:
    """The model card beside a model file: ``<name>.md`` (the shipped model's is refnet_phantom.md)."""
    return os.path.splitext(modelPath or SHIPPED_MODEL_PATH)[0] + ".md"


def modelCardSummary(modelPath: str | None) -> str:
    """A few lines from the model card, read as text: no torch import, no model load (the module opens fast).

    Shows the card's intended use and its Inputs, Spacing and Training data rows; the shipped model is
    always labelled as a demonstration model.
    """
    lines = []
    if not modelPath:
        lines.append("Demonstration model, trained on generated phantoms; train on your own data for real use.")
    card = modelCardPath(modelPath)
    try:
        with open(card, encoding="utf-8") as file:
            text = file.read()
    except OSError:
        lines.append(f"No model card beside this file ({os.path.basename(card)}): nothing is known about its "
                     "training data or spacing; its inputs are read when Refine loads it.")
        return "\n".join(lines)
    for row in text.splitlines():
        if row.startswith("**Intended use**") and modelPath:
            lines.append(row.replace("**", "").strip())
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in ("Inputs", "Spacing", "Training data"):
            detail = cells[1].replace("`", "")
            lines.append(f"{cells[0]}: {detail if len(detail) <= 160 else detail[:157] + '...'}")
    return "\n".join(lines)
