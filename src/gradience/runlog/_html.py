"""HTML pieces of the report: escaping, number formats, tables, bars. No scripts, no links."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:980px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.5em;border-bottom:2px solid #1f77b4;padding-bottom:.2em}
h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f6f8} td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{color:#a33;font-weight:600} .ok{color:#2a7a2a;font-weight:600}
.bar{display:inline-block;height:.8em;background:#1f77b4;vertical-align:middle}
td.bar-cell{min-width:16em} .note{color:#555;font-size:.9em} img{max-width:100%}
"""


class Raw(str):
    """A table cell that is already HTML (built here from escaped parts): not escaped again."""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(x: Any, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return esc(x)
    return f"{int(x)}" if float(x).is_integer() else f"{x:.{digits}f}"


def g(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def lag(x: int | None) -> str:
    return "n/a" if x is None else (f"{x:+d}" if x else "0")


def table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows of already formatted cells; numbers-looking cells are right-aligned, `Raw` cells kept."""
    out = ["<table>" + ("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else "")]
    for row in rows:
        cells = "".join(_cell(c) for c in row)
        out.append(f"<tr>{cells}</tr>")
    return "\n".join([*out, "</table>"])


def _cell(c: Any) -> str:
    if isinstance(c, Raw):
        return f'<td class="bar-cell">{c}</td>'
    return f'<td class="n">{esc(c)}</td>' if _numeric(c) else f"<td>{esc(c)}</td>"


def _numeric(cell: Any) -> bool:
    return isinstance(cell, str) and cell.lstrip("+-").replace(".", "", 1).rstrip("%x").isdigit()


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return table((), ((k, v) for k, v in pairs))


def ul(items: Iterable[str], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    body = "".join(f"<li>{esc(i)}</li>" for i in items)
    return f"<ul{attr}>{body}</ul>" if body else ""


def bar(fraction: float, label: str = "") -> Raw:
    """A horizontal bar `fraction` (0..1) of the cell wide, with a label after it."""
    width = max(0.0, min(1.0, fraction)) * 12
    return Raw(f'<span class="bar" style="width:{width:.2f}em"></span> {esc(label)}')
