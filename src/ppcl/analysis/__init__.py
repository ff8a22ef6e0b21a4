"""Stage 1 of PPCL: residual linear probes, CKA trajectories, contiguous intervals, baselines, reports.

Analysis measures; planning decides: a report becomes a plan in :mod:`ppcl.plan` (:func:`ppcl.plan.plan_from_report`).
"""

from ppcl.analysis.analyze import AnalysisConfig, analyze
from ppcl.analysis.report import RedundancyReport

__all__ = ["AnalysisConfig", "RedundancyReport", "analyze"]
