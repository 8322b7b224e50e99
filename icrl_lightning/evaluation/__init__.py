"""In-context evaluation: the paper's protocol and scenarios, baselines, summaries, the report
and its figures (see ``protocol.EvalProtocol`` for the options)."""

from icrl_lightning.evaluation.protocol import SCENARIOS, EvalProtocol, paper_schedule, run_baseline
from icrl_lightning.evaluation.report import summarize, write_report

__all__ = ["SCENARIOS", "EvalProtocol", "paper_schedule", "run_baseline", "summarize", "write_report"]
