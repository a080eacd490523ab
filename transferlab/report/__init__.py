"""Reports from tidy results: pivot tables (CSV / Markdown / LaTeX), seaborn figures, the hypothesis test.

- :func:`pivot_matrix` - one attack matrix as a DataFrame (crafted-on rows x evaluated columns).
- :func:`write_matrix_outputs` - tables, heatmaps, eps curves, example images and summary.md for a matrix.
- :func:`hypothesis_summary` - the pooled answer to "do same-pretraining examples transfer better?".
- :func:`write_study_report` - report.md / report.html / report.tex and tables/ for a study results folder.
"""

from transferlab.report.hypothesis import hypothesis_by_setting, hypothesis_summary, per_target_table
from transferlab.report.matrices import eps_label, eps_text, pivot_matrix, write_matrix_outputs
from transferlab.report.study_report import write_study_report

__all__ = ["eps_label", "eps_text", "hypothesis_by_setting", "hypothesis_summary", "per_target_table", "pivot_matrix",
           "write_matrix_outputs", "write_study_report"]
