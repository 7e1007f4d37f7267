"""Statistics reports: seaborn figures, and self-contained HTML with a Markdown twin.

``build_report(run_dirs, out_dir)`` is the entry point behind ``qvd-bench report``;
``figures`` holds the figure functions, usable on their own (e.g. in notebooks).
"""

from qvd_bench.report.figures import ReportFigure
from qvd_bench.report.render import build_report

__all__ = ["ReportFigure", "build_report"]
