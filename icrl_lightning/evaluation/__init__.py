"""In-context evaluation: the paper's protocol, baselines and the report."""

from icrl_lightning.evaluation.protocol import EvalProtocol, paper_schedule, run_baseline
from icrl_lightning.evaluation.report import summarize, write_report

__all__ = ["EvalProtocol", "paper_schedule", "run_baseline", "summarize", "write_report"]
