"""Command-line behaviour of the small tools in ``tools/`` that no other test runs."""

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TB_SCALARS = TOOLS / "tb_scalars.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TB_SCALARS), *args], capture_output=True, text=True, timeout=120)


def test_tb_scalars_help_and_errors(tmp_path):
    out = _run("--help")
    assert out.returncode == 0 and "usage:" in out.stdout and "prefix" in out.stdout
    missing = _run(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'nowhere'} does not exist"
    empty = _run(str(tmp_path))
    assert empty.returncode == 2 and "holds no TensorBoard scalars" in empty.stderr


def test_tb_scalars_prints_tags_with_prefix(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path)) as w:
        for step in range(7):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
            w.add_scalar("val/last10", 0.1 * step, step)
    out = _run(str(tmp_path), "train/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["train/loss (7 points) ... 2:0.3333, 3:0.25, 4:0.2, 5:0.1667, 6:0.1429"]


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hole_move_probe_untried_against_tried():
    """``tools/hole_move_probe.py``'s learner-context count: untried against tried moves of a tile,
    before and after the sequence's first success."""
    import numpy as np
    import pytest

    from icrl_lightning.episodes import Episode

    probe = _load_tool("hole_move_probe")
    episodes = [Episode([0, 1, 5], [2, 1], [0.0, 0.0], True),  # tile 0: nothing tried yet; tile 1 likewise
                Episode([0, 4, 15], [1, 2], [0.0, 1.0], True),  # tile 0: move 2 tried; then the first success
                Episode([0, 1], [3], [0.0], False, truncated=True)]  # tile 0: moves 1 and 2 tried
    q = np.array([[9, 9, 9, 9], [9, 9, 9, 9], [1, 2, 5, 0], [9, 9, 9, 9], [3, 0, 0, 1]], dtype=float)
    out = probe.untried_against_tried(episodes, q)
    assert out["all"] == {"gap": [-4.0, 2.0], "argmax": [0.0, 1.0], "uniform": [0.75, 0.5]}
    assert out["before goal"] == {"gap": [-4.0], "argmax": [0.0], "uniform": [0.75]}
    with pytest.raises(ValueError, match="4 Q rows for 5 actions"):
        probe.untried_against_tried(episodes, q[:4])


def test_probe_copy_context_episodes():
    """``tools/probe_copy.py``'s contexts: one oracle episode with the oracle's return, one rewarded
    random episode, and none where the tries run out."""
    import numpy as np

    from icrl_lightning.envs import DarkKeyToDoor
    from icrl_lightning.envs.key_to_door import key_door_task

    probe = _load_tool("probe_copy")
    fam, task = DarkKeyToDoor(), key_door_task(9, 4 * 9 + 6, 0)  # key 2 right of the start, door top left
    ctx = probe.context_episodes(fam, task, np.random.default_rng(0))
    assert ctx["none"] == [] and len(ctx["oracle"]) == 1 and len(ctx["random"]) == 1
    assert ctx["oracle"][0].ret == 1 + 50 - 2 - (4 + 6) + 1  # key after 2 steps, the door 10 later
    assert ctx["random"][0].ret > 0 and len(ctx["random"][0].actions) == 50
    far = key_door_task(9, 0, 80)  # the key in a corner: no random walk of 1 try finds it
    assert probe.context_episodes(fam, far, np.random.default_rng(0), tries=1)["random"] == []


def test_gym_maps_are_deterministic_and_load_as_eval_maps(tmp_path):
    from icrl_lightning.checks import InputError
    from icrl_lightning.envs.frozen_lake import FrozenLake

    gym_maps = _load_tool("gym_maps")
    maps = gym_maps.gym_maps(n=12, sizes=(3, 5), seed=3)
    assert maps == gym_maps.gym_maps(n=12, sizes=(3, 5), seed=3) != gym_maps.gym_maps(n=12, sizes=(3, 5), seed=4)
    assert {len(m) for m in maps} <= {3, 4, 5} and all(len(row) == len(m) for m in maps for row in m)
    assert all(m[0][0] == "S" and m[-1][-1] == "G" for m in maps)
    out = tmp_path / "maps.json"
    assert gym_maps.main(["--n", "12", "--sizes", "6-7", "--out", str(out)]) == 0
    tasks = FrozenLake().load_task_file(str(out))
    assert len(tasks) == 12
    # the committed files of conf/experiment/eval_gym*.yaml are the tool's defaults
    data = TOOLS.parent / "data"
    assert (data / "gym_maps.json").read_text() == gym_maps.dumps(gym_maps.gym_maps(sizes=(3, 5)))
    assert (data / "gym_maps_ood.json").read_text() == gym_maps.dumps(gym_maps.gym_maps(sizes=(6, 7)))
    with pytest.raises(InputError, match=r"--sizes=5-3"):
        gym_maps.gym_maps(sizes=(5, 3))
