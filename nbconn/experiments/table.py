"""The table a notebook shows: rows under headers, as HTML in JupyterLab and as aligned text elsewhere.

Notebooks 01-03 build their tables in their cells from what the kernel answered; notebook 00's
experiments (:mod:`nbconn.experiments.nb00`) return one.  This module sits with the experiments in the
layering (README, Architecture): the core and the lab never draw anything, the view may show a table.
"""

from __future__ import annotations

import html


class Table:
    """Rows with headers; ``_repr_html_`` for JupyterLab, ``repr`` as aligned text.

    ``highlight(row)`` marks a row (yellow in HTML, ``<-`` in text): the row the lesson is about.
    """

    def __init__(self, headers, rows, *, title: str | None = None, highlight=None) -> None:
        self.headers = list(headers)
        self.rows = [[str(c) for c in row] for row in rows]
        self.title = title
        self.highlight = highlight or (lambda row: False)

    def __repr__(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(self.headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [self.title] if self.title else []
        out += [line(self.headers), line(["-" * w for w in widths])]
        out += [line(r) + ("   <-" if self.highlight(r) else "") for r in self.rows]
        return "\n".join(out)

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.headers)
        body = []
        for r in self.rows:
            style = " style='background:#fff3cd'" if self.highlight(r) else ""
            cells = "".join(f"<td style='text-align:left'><code>{html.escape(c)}</code></td>" for c in r)
            body.append(f"<tr{style}>{cells}</tr>")
        caption = f"<caption style='text-align:left'>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def options_table(result) -> Table:
    """Requested vs effective socket options of one Result (step 2); rows the kernel changed are marked."""
    rows = [[name, repr(result.requested.get(name)), repr(value),
             "yes" if value != result.requested.get(name) else "no"]
            for name, value in result.effective.items()]
    return Table(["option", "requested", "effective (getsockopt)", "changed by the kernel"], rows,
                 title="step 2: what was asked for, and what the kernel kept",
                 highlight=lambda r: r[3] == "yes")


__all__ = ["Table", "options_table"]
