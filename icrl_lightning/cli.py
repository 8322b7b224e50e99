"""``python -m icrl_lightning fit|validate ...``: Lightning's own CLI in omegaconf mode."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from icrl_lightning.checks import InputError, MissingInputFile, import_class, read_input_file
from icrl_lightning.data import ReplayDataModule
from icrl_lightning.module import ICRLModule
from icrl_lightning.objective import without_removed_options

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of bf16 matrix instructions under which --cpu_bf16 auto trains in bf16 (checked in
# this order; measured faster than float32 on a 2-core CPU with each: docs/results.md).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class ICRLCLI(LightningCLI):
    """Lightning's CLI for ``ICRLModule`` + ``ReplayDataModule``, with two subcommands: ``fit``
    (train, then evaluate in context) and ``validate`` (evaluate a checkpoint in context).

    After the classes are built, the model's serializer (and the batch fields its objective reads)
    is handed to the data module. ``--ckpt_path`` is checked before any work (a file that is a
    Lightning checkpoint); ``--ckpt_path last`` finds the newest ``last*.ckpt`` of this experiment,
    also in the logger's earlier ``version_N`` folders (Lightning itself looks only in the new
    run's folder, finds nothing and starts from scratch)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        # The agent's default context window is the length the model was trained on; the model reads
        # and plays the data's problem family.
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.env", "model.env")
        parser.add_argument(
            "--cpu_bf16", type=bool | Literal["auto"], default=False,
            help="auto: on a CPU with bf16 matrix instructions (Intel AMX or AVX-512 BF16: amx_bf16 or "
                 "avx512_bf16 in /proc/cpuinfo) a float32 trainer.precision becomes bf16-mixed (bf16 "
                 "autocast; the Q readout stays float32), elsewhere it stays 32-true (bf16 without "
                 "them is slower); the log says which. true: bf16-mixed for a float32 CPU run on any "
                 "CPU. false: trainer.precision as written. The saved config.yaml holds the precision "
                 "that ran.")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        choice = config.get("cpu_bf16")
        if choice:
            precision = resolve_cpu_bf16(config.trainer.get("accelerator"), config.trainer.get("precision"),
                                         force=choice is True)
            if precision is not None:
                config.trainer.precision = precision
            config.cpu_bf16 = False  # the saved config.yaml states what ran, on any machine it is re-run on

    def _parse_ckpt_path(self) -> None:
        # Lightning's own step (its code, on the checked file): the checkpoint's hyper-parameters
        # become the model's config, first of all; less the options removed since it was saved, with
        # the groups added since at the value it trained with (objective.ADDED).
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt or ckpt == "last":
            return
        saved = check_checkpoint(ckpt)
        check_family(ckpt, saved, self.config[sub].get("data", {}).get("env"))
        hparams = without_removed_options({k: v for k, v in (saved.get("hyper_parameters") or {}).items()
                                           if k != "_instantiator"})
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.set_serializer(self.model.serializer, self.model.batch_fields)
        self.model.check_agent()

    def _checked_ckpt(self) -> str | None:
        config = self.config_init[self.subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            found = last_checkpoint(self.trainer)
            if found is None:
                if self.subcommand == "validate":
                    raise InputError("--ckpt_path last: this experiment has no last*.ckpt to evaluate "
                                     f"(looked under {self.trainer.default_root_dir} and the logger's folders)")
                return None  # fit starts from scratch (Lightning says so)
            log.info("--ckpt_path last: resuming from %s", found)
            config["ckpt_path"] = ckpt = str(found)
        if ckpt is not None:
            check_checkpoint(ckpt)
        return ckpt

    def before_fit(self) -> None:
        self._checked_ckpt()

    def before_validate(self) -> None:
        if self._checked_ckpt() is None:
            print("warning: validate without --ckpt_path evaluates an UNTRAINED model (random weights); "
                  "its report says so", file=sys.stderr)


def cpu_bf16_unit(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The flag of this CPU's bf16 matrix instructions, which make bf16 autocast faster than float32:
    Intel AMX (``amx_bf16``) or AVX-512 BF16 (``avx512_bf16``, e.g. an AMD EPYC of the Zen 4
    generation), the first found among the flags of ``cpuinfo``; None for other CPUs (an AMD EPYC
    with AVX2 only has no bf16 path) and systems without the file. Measurements: docs/results.md,
    "Speed and memory"."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    return next((flag for flag in BF16_FLAGS if flag in flags), None)


def resolve_cpu_bf16(accelerator, precision, force: bool = False) -> str | None:
    """``--cpu_bf16 auto`` (``force``: ``true``): the trainer precision to use instead of
    ``precision``, or None to keep it. Only a float32 run on the CPU changes, to ``bf16-mixed``
    where ``cpu_bf16_unit()`` (or ``force``); the choice is logged either way."""
    name = accelerator if isinstance(accelerator, str) else None
    on_cpu = name == "cpu" or (name in (None, "auto") and not torch.cuda.is_available()
                               and not torch.backends.mps.is_available())
    if not on_cpu or str(precision) not in ("32-true", "32", "None"):
        rank_zero_info(f"--cpu_bf16: not a float32 run on the CPU (accelerator {accelerator}, precision "
                       f"{precision}): trainer.precision as written")
        return None
    unit = None if force else cpu_bf16_unit()
    use = force or bool(unit)
    absent = " or ".join(BF16_FLAGS)
    found = f"bf16 matrix instructions ({unit})" if unit else f"no bf16 matrix instructions (no {absent})"
    why = "true" if force else f"auto: this CPU has {found}"
    rank_zero_info(f"--cpu_bf16 {why}: trainer.precision {'bf16-mixed' if use else '32-true'}")
    return "bf16-mixed" if use else None


def check_checkpoint(path: str, what: str = "--ckpt_path") -> dict:
    """Raise ``InputError`` in one line naming ``what`` unless ``path`` is a readable Lightning
    checkpoint of plain tensors and values (it is loaded with ``weights_only=True``: no pickled
    objects); returns it as loaded (memory-mapped)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputFile(f"{what}: {path} does not exist")
    if p.is_dir():
        hint = next(iter(sorted(p.glob("**/last.ckpt"))), None)
        raise InputError(f"{what}: {path} is a folder; give a .ckpt file" + (f", e.g. {hint}" if hint else ""))
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except PermissionError:
        raise InputError(f"{what}: {path} is not readable (permission denied)") from None
    if not magic:
        raise InputError(f"{what}: {path} is empty")
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise InputError(f"{what}: {path} is not a PyTorch checkpoint (not the zip archive torch.save writes)")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except PermissionError:
        raise InputError(f"{what}: {path} is not readable (permission denied)") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{what}: {path} is not a readable PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise InputError(f"{what}: {path} is not a checkpoint written by icrl_lightning's fit "
                         "(no state_dict / hyper_parameters)")
    return ckpt


def check_family(ckpt: str, saved: dict, env) -> None:
    """Raise ``InputError`` when the checkpoint (``saved``: as ``check_checkpoint`` read it) was
    trained on another problem family than the configuration's ``data.env`` (a checkpoint of
    before families is Frozen Lake's)."""
    trained = (saved.get("hyper_parameters") or {}).get("env") or {}
    trained_path = trained.get("class_path", "icrl_lightning.envs.frozen_lake.FrozenLake")
    given = getattr(env, "class_path", None) or (env.get("class_path") if isinstance(env, dict) else None)
    if given is None:
        return
    if import_class(trained_path, "--ckpt_path model.env") is not import_class(given, "data.env"):
        raise InputError(f"--ckpt_path: {ckpt} was trained on {trained_path.rpartition('.')[2]} "
                         f"(model.env), but data.env is {given.rpartition('.')[2]}: give the configuration "
                         "it was trained with (-c ...)")


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The newest ``last*.ckpt`` where this trainer's ``ModelCheckpoint`` callbacks write: their
    ``dirpath`` if set, else ``{logger.save_dir}/{logger.name}/*/checkpoints`` (every version of
    the experiment), else ``{default_root_dir}/checkpoints``."""
    folders: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is not None:
            folders.append(Path(cb.dirpath))
        elif trainer.loggers and trainer.loggers[0].save_dir is not None:
            logger = trainer.loggers[0]
            folders += sorted((Path(logger.save_dir) / str(logger.name)).glob("*/checkpoints"))
        else:
            folders.append(Path(trainer.default_root_dir) / "checkpoints")
    candidates = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_warnings() -> None:
    """Silence what third-party code prints about itself on our normal path and no call of ours can
    avoid: Lightning 2.6's own use of a torch ``_pytree`` API that torch 2.13 deprecates, Lightning's
    caution that an ``IterableDataset`` with ``__len__`` may repeat data across workers
    (``ReplayStream`` gives every worker a disjoint share of the maps), its note that a checkpoint
    evaluated into another folder does not restore the training run's checkpoint bookkeeping (an
    evaluation writes no checkpoints), that its model summary cannot size bf16-mixed weights (the
    weights are float32 under autocast; the summary counts them as such), and its logging-service tip."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvert) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvert())


def check_config_files(args: list[str]) -> None:
    """Every ``-c`` / ``--config`` file: a readable UTF-8 YAML mapping, else ``InputError`` in one
    line naming the file (the parser's own messages for these do not always name it)."""
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            continue
        what = f"-c {path}"
        text = read_input_file(path, "-c")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InputError(f"{what} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(doc, dict):
            raise InputError(f"{what}: expected a mapping of sections (trainer, model, data, ...), "
                             f"got {type(doc).__name__}")


def main(args: list[str] | None = None, model_class: type[ICRLModule] = ICRLModule,
         datamodule_class: type[ReplayDataModule] = ReplayDataModule,
         prog: str = "python -m icrl_lightning", run: bool = True) -> ICRLCLI:
    """Run the command line. A bad configuration value or input file (``InputError``, raised before
    any work starts), the parser's own errors (unknown keys, wrong types) and Lightning's
    ``MisconfigurationException`` (trainer settings that contradict each other) are printed as
    ``error: ...`` on one line, without a traceback or the usage text, and exit with status 2.
    ``model_class`` / ``datamodule_class``: subclasses of the two (what ``icrl_lightning.experimental``
    studies), with ``prog`` their command's name. ``run=False``: build the model, data module and
    trainer from ``args`` (no subcommand) without running anything (``tools/bench_train.py``)."""
    torch.set_float32_matmul_precision("high")
    quiet_known_warnings()
    argv = list(sys.argv[1:] if args is None else args)
    try:
        check_config_files(argv)
        return ICRLCLI(
            model_class,
            datamodule_class,
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False, "prog": prog},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except (InputError, ArgumentError, MisconfigurationException, ValueError) as err:
        if not isinstance(err, (InputError, ArgumentError, MisconfigurationException)):
            # jsonargparse wraps what a class raises while it checks a linked value (model.env).
            err = _input_error(err)
            if err is None:
                raise
        message = " ".join(line.strip() for line in str(err).strip().splitlines())
        hint = "" if isinstance(err, InputError) else f"  ({prog} fit --help lists every option)"
        print(f"error: {message}{hint}", file=sys.stderr)
        raise SystemExit(2) from err


def _input_error(err: BaseException | None) -> InputError | None:
    """The ``InputError`` that ``err`` was raised from (its ``__cause__`` chain), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None
