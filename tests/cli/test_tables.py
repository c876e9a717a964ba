"""The CLI's tables keep ids whole in a narrow terminal (an id is what the next command takes)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from spkd.cli.client import _id_column


def test_ids_are_never_cut_at_80_columns() -> None:
    table = Table(_id_column(), "status", "stage", "teacher -> student", "created")
    job_id = "job_01m8q8y92qqkqgwxn0dt"
    table.add_row(
        job_id,
        "succeeded",
        "export",
        "tf_efficientnet_lite2 -> tf_efficientnet_lite0",
        "2026-11-30T22:24:22Z",
    )
    out = io.StringIO()
    Console(file=out, width=80).print(table)
    assert job_id in out.getvalue(), out.getvalue()
