"""Stage 1 of PPCL: residual linear probes, CKA trajectories, contiguous intervals, baselines, reports."""

from ppcl.analysis.analyze import AnalysisConfig, analyze
from ppcl.analysis.propose import plan_from_removed, plan_from_report
from ppcl.analysis.report import RedundancyReport

__all__ = ["AnalysisConfig", "RedundancyReport", "analyze", "plan_from_removed", "plan_from_report"]
