"""Write ``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrsam.files import atomic_write_text
from cxrsam.report.tables import display_rows, table_markdown

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"""


@dataclass
class ReportContent:
    """Everything a report shows.

    Attributes:
        title: report heading.
        table: comparison table (:func:`cxrsam.report.tables.comparison_table`).
        reference: the method p-values are computed against.
        figures: caption -> PNG path.
        config_text: the YAML config used.
        manifest: path of the split manifest CSV.
        notes: free Markdown paragraphs (software versions, timings).
    """

    title: str
    table: pd.DataFrame
    reference: str | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    config_text: str = ""
    manifest: Path | None = None
    notes: list[str] = field(default_factory=list)


def _markdown(content: ReportContent, out_dir: Path) -> str:
    parts = [f"# {content.title}", "", table_markdown(content.table), ""]
    if content.reference:
        parts += [f"p: paired two-sided Wilcoxon signed-rank test of per-image Dice against **{content.reference}**. "
                  "Mean ± std over test images; 95% CI: percentile bootstrap of the mean (2000 resamples).", ""]
    parts += [*content.notes, ""]
    for caption, path in content.figures.items():
        parts += [f"## {caption}", "", f"![{caption}]({Path(path).relative_to(out_dir)})", ""]
    if content.manifest:
        parts += [f"Split manifest: `{Path(content.manifest).relative_to(out_dir)}`", ""]
    if content.config_text:
        parts += ["## Configuration", "", "```yaml", content.config_text.rstrip(), "```", ""]
    return "\n".join(parts)


def _html(content: ReportContent, out_dir: Path) -> str:
    header, rows = display_rows(content.table)
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
             + "</table>")
    body = [f"<h1>{html.escape(content.title)}</h1>", table]
    if content.reference:
        body.append(f"<p>p: paired two-sided Wilcoxon signed-rank test of per-image Dice against "
                    f"<b>{html.escape(content.reference)}</b>. Mean ± std over test images; 95% CI: percentile "
                    "bootstrap of the mean.</p>")
    body += [f"<p>{html.escape(n)}</p>" for n in content.notes]
    for caption, path in content.figures.items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        body.append(f"<h2>{html.escape(caption)}</h2><img alt=\"{html.escape(caption)}\" "
                    f"src=\"data:image/png;base64,{data}\">")
    if content.manifest:
        manifest = pd.read_csv(content.manifest)
        counts = manifest["split"].value_counts().to_dict()
        body.append("<h2>Split</h2><p>" + ", ".join(f"{k}: {v}" for k, v in counts.items())
                    + f" (manifest: {html.escape(str(Path(content.manifest).relative_to(out_dir)))})</p>")
    if content.config_text:
        body.append(f"<h2>Configuration</h2><pre>{html.escape(content.config_text)}</pre>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(content.title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report(content: ReportContent, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/report.md`` and ``out_dir/report.html``; figure paths must lie under ``out_dir``."""
    out_dir = Path(out_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, _markdown(content, out_dir))
    atomic_write_text(page, _html(content, out_dir))
    return md, page
