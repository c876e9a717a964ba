"""How much evidence a job's choices rest on: a selection split with very few images per class picks
best epochs and the shipped student almost by chance (a handful of images flips the choice).

`thin_selection` says so in one sentence, with the numbers and what to do; the run reports it as a
`warning` event once the scan is done (models/training/run.py) and the report repeats it
(metrics.json `protocol.selection_note`).
"""

from __future__ import annotations

from spkd.common.scan import count_per_class
from spkd.models.data.loader import DatasetScan

# Below either threshold the choices rest on little evidence: with 5 images a class, one image is 20
# points of that class's accuracy; with 100 in all, one image is a full point overall.
MIN_PER_CLASS = 5
MIN_TOTAL = 100


def thin_selection(scan: DatasetScan, selection_fraction: float) -> str | None:
    """A warning sentence when a part of the selection split has fewer than MIN_PER_CLASS images in
    some class or fewer than MIN_TOTAL in all; None when it has enough or when there is no selection
    split (the last epoch ships, nothing is chosen). `selection_fraction`: the spec's, named in the
    advice when the split is carved out of train."""
    parts = {"the selection split": scan.selection}
    if scan.ship:  # two choices, each on its own part
        parts = {"the selection split's pick part": scan.selection, "its ship part": scan.ship}
    if not scan.selection:
        return None
    found = []
    for name, samples in parts.items():
        counts = count_per_class(samples, scan.classes)
        fewest = min(scan.classes, key=lambda c: counts[c])
        if counts[fewest] < MIN_PER_CLASS or len(samples) < MIN_TOTAL:
            found.append(f"{name} has {len(samples)} images, {counts[fewest]} of them of class {fewest!r}")
    if not found:
        return None
    carved = scan.roles.get("selection") != "val/"
    more = (
        f"raise dataset.selection_fraction (now {selection_fraction:g}) or add training images"
        if carved
        else "add images to val/ (it is the selection split, since the dataset has a test/ split)"
    )
    return (
        f"few selection images: {'; '.join(found)} (fewer than {MIN_PER_CLASS} in a class or "
        f"{MIN_TOTAL} in all). The best epochs and the shipped student are chosen on these images, so "
        f"those choices rest on little evidence: {more}."
    )
