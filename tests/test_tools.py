"""Command-line behaviour of the small tools in ``tools/`` that no other test runs."""

import subprocess
import sys
from pathlib import Path

TB_SCALARS = Path(__file__).resolve().parents[1] / "tools" / "tb_scalars.py"


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
