"""``ppcl demo``: the whole method on the embedded toy world, with a self-contained HTML report."""

from ppcl.demo.run import LEVELS, DemoConfig, DemoResult, make_plan, run_demo

__all__ = ["LEVELS", "DemoConfig", "DemoResult", "make_plan", "run_demo"]
