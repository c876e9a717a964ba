"""What each accuracy and loss is called, by the split it was measured on.

Every number a person reads names its split (docs/artifacts.md#names-every-number-names-its-split):
an epoch row of a curve carries `selection_acc` / `selection_loss` (or `report_acc` /
`report_loss` when the job has no selection split, `eval_split` says which), a model's block in
metrics.json carries `report_acc` / `report_loss` (and `select_acc`, the chosen epoch's selection
accuracy). Jobs stored before the rename used `val_acc` / `val_loss` for both; readers go through
these helpers, which accept the old key as a fallback.
"""

from __future__ import annotations

from typing import Any

OLD_ACC, OLD_LOSS = "val_acc", "val_loss"  # the names of jobs stored before the split was named


def split_key(split: str, what: str) -> str:
    """`selection_acc`, `report_loss`, ...: the key of `what` (acc or loss) measured on `split`."""
    return f"{split}_{what}"


def _get(block: Any, key: str, old: str) -> float | None:
    if not isinstance(block, dict):
        return None
    value = block.get(key, block.get(old))
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def report_acc(block: Any) -> float | None:
    """A metrics.json model block's report-split accuracy (0..1); None when absent or not a block.
    Old jobs' `val_acc` is read when `report_acc` is missing."""
    return _get(block, "report_acc", OLD_ACC)


def row_acc(row: dict[str, Any]) -> float | None:
    """An epoch row's accuracy on the split it was scored on (`eval_split`, selection by default);
    rows written before the rename carry it as `val_acc`."""
    return _get(row, split_key(row.get("eval_split") or "selection", "acc"), OLD_ACC)


def row_loss(row: dict[str, Any]) -> float | None:
    """An epoch row's mean CE loss (nats) on the split it was scored on; old rows: `val_loss`."""
    return _get(row, split_key(row.get("eval_split") or "selection", "loss"), OLD_LOSS)
