"""``isstad-benchmark``: train and test each model on each category, publish one comparable table.

Each (model, category) row runs in its own process (``job.py``) so its peak memory is its own and a
crash or kill loses only that row; finished rows are kept in ``results.csv`` and skipped on the next
run unless their configuration changed. ``report.py`` turns the CSV into Markdown and a chart.
"""

from .config import BenchmarkConfig, RunSpec, load_config

__all__ = ["BenchmarkConfig", "RunSpec", "load_config"]
