"""PNG figures of real (tiny) reports: curves with bands and baselines, trajectories, comparisons."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from icrl_lightning.agent import InContextAgent
from icrl_lightning.envs import make_splits
from icrl_lightning.evaluation import EvalProtocol
from icrl_lightning.evaluation.figures import (
    STYLE,
    comparison_figure,
    curve_figure,
    pick_map,
    trajectory_figure,
    write_figures,
)
from icrl_lightning.evaluation.runner import Evaluator


@pytest.fixture(scope="module")
def reports(tiny_model, repo_root) -> dict[str, dict]:
    model, _, s = tiny_model("compact", seed=1)
    agent = InContextAgent(model, s, max_context=256, max_episode_steps=12)
    batch = list(enumerate(make_splits(0, 0).heldout[:3]))
    out = {}
    for scenario in ("standard", "nonstationary", "stitching"):
        stitching = scenario == "stitching"
        protocol = EvalProtocol(scenario=scenario, schedule=None if stitching else [0.0, 0.5, 1.0],
                                max_episode_steps=12, last_k=1,
                                stitching_file=str(repo_root / "data" / "stitching.json") if stitching else None)
        protocol.check()
        ev = Evaluator(protocol)
        out[scenario] = ev.finish([ev.run(agent, batch)], global_step=1)[1]
    return out


def _png(path):
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    return img


@pytest.mark.parametrize("scenario", ["standard", "nonstationary", "stitching"])
def test_write_figures(reports, scenario, tmp_path):
    paths = write_figures(reports[scenario], tmp_path)
    assert [p.name for p in paths] == ["curves.png", "trajectories.png"]
    for p in paths:
        img = _png(p)
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_curve_figure_draws_every_agent_with_bands(reports):
    fig = curve_figure(reports["standard"])
    ax, ax2 = fig.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [STYLE[a][0] for a in reports["standard"]["agents"]]
    # bands (fill_between) for the model with and without context; baselines are lines only
    assert len(ax.collections) == 2
    icrl = reports["standard"]["agents"]["icrl"]
    assert np.allclose(ax.get_lines()[0].get_ydata(), icrl["mean_return"])
    # right panel: cumulative share of maps with a first success, ending at 1 - never
    y = ax2.get_lines()[0].get_ydata()
    assert y[-1] == pytest.approx(1 - icrl["never_succeeded"])


def test_nonstationary_curve_marks_the_switch(reports):
    fig = curve_figure(reports["nonstationary"])
    ax = fig.axes[0]
    switch = [line for line in ax.get_lines() if list(line.get_xdata()) == [2.5, 2.5]]
    assert switch, "no vertical line at the map switch"


def test_trajectory_figure_panels(reports):
    assert len(trajectory_figure(reports["standard"]).axes) == 2
    assert len(trajectory_figure(reports["nonstationary"]).axes) == 4
    st = trajectory_figure(reports["stitching"])
    assert "context episodes" in st.axes[0].get_title()
    # The two context episodes of data/stitching.json, read from the report's context records.
    legend = [t.get_text() for t in st.axes[0].get_legend().get_texts()]
    assert legend == ["context 1: return 1", "context 2: return 0"]
    assert 0 <= pick_map(reports["standard"]) < 3


def test_comparison_figure(reports, tmp_path):
    rep = reports["standard"]
    fig = comparison_figure({"high": rep, "low": rep})
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels[:2] == ["high", "low"] and "oracle" in labels
    fig.savefig(tmp_path / "c.png")
    _png(tmp_path / "c.png")
