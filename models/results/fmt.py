"""The small formatters the report's sections share (models/results/report.py and
models/results/deploy_report.py): numbers that may be missing, percentages, HTML escaping."""

from __future__ import annotations

import html
from typing import Any


def is_number(v: Any) -> bool:
    """A real int or float, not a bool and not NaN."""
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def pct(v: Any) -> str:
    """0.9415 -> '94.2%'; 'n/a' when missing."""
    return f"{100 * v:.1f}%" if is_number(v) else "n/a"


def esc(v: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(v), quote=True)


def signed(v: Any) -> str:
    """+1.2 / -0.6 (points); 'n/a' when missing."""
    return f"{v:+.1f}" if is_number(v) else "n/a"


def short(v: Any) -> str:
    """Floats to 4 significant digits, None to '', anything else escaped."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else esc(v)
