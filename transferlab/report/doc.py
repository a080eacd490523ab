"""A tiny document model: headings, paragraphs, tables, images, rendered to Markdown, HTML or LaTeX.

Reports are built once as a list of blocks and rendered three ways, so the Markdown,
the self-contained HTML and the LaTeX versions always say the same thing. Tables are
DataFrames of display strings; an optional same-shaped frame of marks ("bold",
"italic" or "") carries cell emphasis (e.g. white-box cells in an attack matrix),
which each renderer expresses in its own syntax.

No Markdown or templating library is needed: the three renderers below are short.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    frame: pd.DataFrame  # display strings; the index is ignored (reset it first if it carries labels)
    marks: pd.DataFrame | None = None  # same shape: "bold", "italic" or ""
    caption: str = ""
    name: str = ""  # file stem when the table is also exported (tables/<name>.csv and .tex)


@dataclass
class Image:
    path: Path
    caption: str = ""


@dataclass
class Doc:
    title: str
    blocks: list = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, frame: pd.DataFrame, marks: pd.DataFrame | None = None, caption: str = "", name: str = "") -> None:
        self.blocks.append(("table", Table(frame, marks, caption, name)))

    def tables(self) -> list[Table]:
        return [block[1] for block in self.blocks if block[0] == "table"]

    def image(self, path: Path, caption: str = "") -> None:
        self.blocks.append(("image", Image(Path(path), caption)))

    def box(self, css_class: str = "summary") -> None:
        """Open a highlighted box (HTML: a framed section); close it with ``end_box``."""
        self.blocks.append(("box", css_class))

    def end_box(self) -> None:
        self.blocks.append(("end_box",))

    def collapsed(self, summary: str) -> None:
        """Open a part shown folded (HTML and Markdown: <details>); close it with ``end_collapsed``."""
        self.blocks.append(("collapsed", summary))

    def end_collapsed(self) -> None:
        self.blocks.append(("end_collapsed",))


# ----------------------------------------------------------------- Markdown
def _md_cell(text: str, mark: str = "") -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    if text and mark == "bold":
        return f"**{text}**"
    if text and mark == "italic":
        return f"_{text}_"
    return text


def table_markdown(table: Table) -> str:
    frame = table.frame
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---:" if j and _numeric(frame.iloc[:, j]) else "---"
                             for j in range(frame.shape[1])) + " |"
    lines = [header, rule]
    for i in range(len(frame)):
        cells = [_md_cell(frame.iat[i, j], _mark(table, i, j)) for j in range(frame.shape[1])]
        lines.append("| " + " | ".join(cells) + " |")
    if table.caption:
        lines += ["", table.caption]
    return "\n".join(lines)


def _numeric(column: pd.Series) -> bool:
    """Right-align a column when most of its cells start like a number ('98.5', '-3.2', '< 0.0001', '3 of 4')."""
    cells = [str(v).strip() for v in column if str(v).strip() not in ("", "-")]
    return bool(cells) and sum(c[0].isdigit() or c[0] in "+-<." for c in cells) * 2 >= len(cells)


def _mark(table: Table, i: int, j: int) -> str:
    if table.marks is None:
        return ""
    value = table.marks.iat[i, j]
    return value if isinstance(value, str) else ""


def render_markdown(doc: Doc, base_dir: Path) -> str:
    """Markdown with images linked relative to ``base_dir`` (the folder the file is written to)."""
    parts = [f"# {doc.title}"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "paragraph":
            parts.append(block[1])
        elif kind == "table":
            parts.append(table_markdown(block[1]))
        elif kind == "image":
            image = block[1]
            link = Path(os.path.relpath(image.path, base_dir)).as_posix()
            parts.append(f"![{image.caption or image.path.stem}]({link})")
            if image.caption:
                parts.append(f"*{image.caption}*")
        elif kind == "collapsed":  # GitHub and most Markdown viewers render raw <details>
            parts.append(f"<details><summary>{html.escape(block[1])}</summary>")
        elif kind == "end_collapsed":
            parts.append("</details>")
        elif kind in ("box", "end_box"):
            parts.append("---")
    return "\n\n".join(parts) + "\n"


# --------------------------------------------------------------------- HTML
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; }
figure { margin: 1em 0; }
figcaption, .caption { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; max-width: 100%; }
section.summary { border: 2px solid #3a6ea5; border-radius: 6px; background: #f4f8fc; padding: 0.2em 1.2em 0.8em;
                  margin: 1em 0 2em; }
section.summary figure { margin: 0.5em 0; }
section.summary img { max-height: 58vh; width: auto; }  /* the headline heatmap fits on the first screen */
details { margin: 1em 0; }
summary { cursor: pointer; font-weight: 600; }
"""


def _html_table(table: Table) -> str:
    frame = table.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    numeric = [j > 0 and _numeric(frame.iloc[:, j]) for j in range(frame.shape[1])]
    rows = []
    for i in range(len(frame)):
        cells = []
        for j in range(frame.shape[1]):
            text = html.escape(str(frame.iat[i, j]))
            mark = _mark(table, i, j)
            if text and mark == "bold":
                text = f"<b>{text}</b>"
            elif text and mark == "italic":
                text = f"<i>{text}</i>"
            cells.append(f'<td class="num">{text}</td>' if numeric[j] else f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else ""
    # Wide matrices scroll inside their own box instead of pushing the page sideways.
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            f"{caption}")


def render_html(doc: Doc) -> str:
    """One self-contained HTML page: every image is embedded as a base64 PNG, nothing is linked."""
    parts = [f"<h1>{html.escape(doc.title)}</h1>"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            level = min(6, block[1])
            parts.append(f"<h{level}>{html.escape(block[2])}</h{level}>")
        elif kind == "paragraph":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append(_html_table(block[1]))
        elif kind == "image":
            image = block[1]
            data = base64.b64encode(image.path.read_bytes()).decode("ascii")
            alt = html.escape(image.caption or image.path.stem)
            caption = f"<figcaption>{html.escape(image.caption)}</figcaption>" if image.caption else ""
            parts.append(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{caption}</figure>')
        elif kind == "box":
            parts.append(f'<section class="{html.escape(block[1])}">')
        elif kind == "end_box":
            parts.append("</section>")
        elif kind == "collapsed":
            parts.append(f"<details><summary>{html.escape(block[1])}</summary>")
        elif kind == "end_collapsed":
            parts.append("</details>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(doc.title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


# -------------------------------------------------------------------- LaTeX
_TEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$", "≤": r"$\leq$", "≥": r"$\geq$", "…": r"\dots{}",
    "δ": r"$\delta$", "ε": r"$\varepsilon$", "−": "-",
}


def tex_escape(text) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def table_latex(table: Table) -> str:
    """A bare tabular (booktabs rules), ready to \\input into any document."""
    frame = table.frame
    spec = "".join("r" if j and _numeric(frame.iloc[:, j]) else "l" for j in range(frame.shape[1]))
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    for i in range(len(frame)):
        cells = []
        for j in range(frame.shape[1]):
            text = tex_escape(frame.iat[i, j])
            mark = _mark(table, i, j)
            if text and mark == "bold":
                text = rf"\textbf{{{text}}}"
            elif text and mark == "italic":
                text = rf"\textit{{{text}}}"
            cells.append(text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_latex(doc: Doc, base_dir: Path) -> str:
    """A compilable article (booktabs + graphicx); images referenced relative to ``base_dir``."""
    sections = {2: "section*", 3: "subsection*", 4: "subsubsection*"}
    parts = [r"\documentclass[10pt]{article}", r"\usepackage[utf8]{inputenc}", r"\usepackage[margin=2cm]{geometry}",
             r"\usepackage{booktabs}", r"\usepackage{graphicx}", r"\begin{document}",
             rf"\section*{{{tex_escape(doc.title)}}}"]
    for block in doc.blocks:
        kind = block[0]
        if kind == "heading":
            parts.append(rf"\{sections.get(block[1], 'paragraph*')}{{{tex_escape(block[2])}}}")
        elif kind == "paragraph":
            parts.append(tex_escape(block[1]))
        elif kind == "table":
            table = block[1]
            # Wide matrices are scaled to the line width rather than running off the page.
            body = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{" + "\n" + table_latex(table) + "}"
            caption = "\n\n" + tex_escape(table.caption) if table.caption else ""
            parts.append(r"\begin{center}" + "\n" + body + "\n" + r"\end{center}" + caption)
        elif kind == "image":
            image = block[1]
            link = Path(os.path.relpath(image.path, base_dir)).as_posix()
            caption = rf"\\ {{\small {tex_escape(image.caption)}}}" if image.caption else ""
            parts.append(r"\begin{center}" + rf"\includegraphics[width=\linewidth]{{{link}}}{caption}"
                         + r"\end{center}")
    parts.append(r"\end{document}")
    return "\n\n".join(parts) + "\n"
