"""The capacity report: an HTML page with PNG charts, rendered from the files of `kvsim run`."""

from kvsim.report.html import compare_reports, render_report

__all__ = ["compare_reports", "render_report"]
