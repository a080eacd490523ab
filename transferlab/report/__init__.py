"""Reports from tidy results: pivot tables (CSV / Markdown / LaTeX), seaborn figures, the hypothesis test.

Every output is drawn from DataFrames (cells, lineage, pairs): a study and ``transferlab attack-matrix``
pass the ones they built, ``transferlab report FOLDER`` reads them from the folder's CSV files.

- :func:`pivot_matrix` - one attack matrix as a DataFrame (crafted-on rows x evaluated columns).
- :func:`write_matrix_outputs` - tables, heatmaps, eps curves, example images and summary.md for a matrix;
  :func:`update_matrix_outputs` - the same, unless they were drawn from these tables already.
- :func:`hypothesis_summary` - the pooled answer to "do same-pretraining examples transfer better?".
- :func:`write_report` - report.md / report.html / report.tex and tables/ from :class:`ReportInputs`;
  :func:`write_study_report` - the same for a study results or attack-matrix folder on disk.
"""

from transferlab.report.hypothesis import hypothesis_by_setting, hypothesis_summary, per_target_table
from transferlab.report.cells import eps_label, eps_text
from transferlab.report.matrices import pivot_matrix, update_matrix_outputs, write_matrix_outputs
from transferlab.report.study_report import ReportInputs, read_inputs, write_report, write_study_report

__all__ = ["ReportInputs", "eps_label", "eps_text", "hypothesis_by_setting", "hypothesis_summary", "per_target_table",
           "pivot_matrix", "read_inputs", "update_matrix_outputs", "write_matrix_outputs", "write_report",
           "write_study_report"]
