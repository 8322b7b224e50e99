"""``ReplayDataModule``: builds the offline dataset when it is absent, streams packed sequences of
multi-episode sets, and serves the evaluation maps."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
from jsonargparse import lazy_instance
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset

from icrl_lightning.behaviour import Behaviour, QLearning
from icrl_lightning.checks import InputError, check_choice, check_range, config_object, object_config
from icrl_lightning.data import dataset
from icrl_lightning.data.stream import SET_ORDERS, EpisodeTable, ReplayLoader, ReplayStream
from icrl_lightning.envs.family import ProblemFamily, Task
from icrl_lightning.envs.frozen_lake import RESERVED_EVAL_MAPS, FrozenLake
from icrl_lightning.episodes import Episode, quality_weights
from icrl_lightning.serialize import EncodedEpisode, Serializer

log = logging.getLogger(__name__)

EVAL_SPLITS = ("heldout", "ood")


class MapList(Dataset):
    """Evaluation tasks (maps); a batch is a list of ``(index, task)``."""

    def __init__(self, maps: list[Task]):
        self.maps = maps

    def __len__(self) -> int:
        return len(self.maps)

    def __getitem__(self, i: int):
        return i, self.maps[i]


def _as_list(batch):
    return batch


class ReplayDataModule(L.LightningDataModule):
    """Offline replay data of a problem family (Frozen Lake by default) and its evaluation tasks
    ("maps" in the option names, after the paper's game).

    Args:
        data_dir: where episode datasets live (``episodes/<settings hash>/``, one folder per
            generating configuration).
        seed: seeds the training maps, the behaviour runs and the replay stream.
        split_seed: seeds the held-out and out-of-distribution maps (kept apart from ``seed`` so that
            runs at different seeds are evaluated on the same maps; training maps never include them).
        env: the problem family and its episode time limit: ``FrozenLake`` (default), ``DarkRoom`` or
            ``BernoulliBandit`` (``icrl_lightning.envs``), or a ``ProblemFamily`` of your own (a class
            path).
        behaviour: the learner that plays the offline data (``QLearning``: tabular Q-learning).
        num_train_maps: training tasks (maps; SPEC: 250).
        episodes_per_map: episodes of the behaviour run on each training map; all are kept.
        set_size_min: fewest episodes of one map in a set (SPEC: 20).
        set_size_max: most episodes of one map in a set (SPEC: 40).
        quality: ``high`` / ``medium`` / ``low``: successes sampled 5x more often than failures,
            unweighted, or the reverse (SPEC data quality; ``random`` order only).
        set_order: ``random`` (SPEC: a set's episodes drawn from the whole run and shuffled) or
            ``learning`` (a window of consecutive episodes of the run, in the order played, as
            Algorithm Distillation trains; one whole history when the behaviour plays histories,
            e.g. ``data.behaviour.history``).
        set_per_sequence: every training sequence is one set from its first episode on (what does
            not fit is dropped, the rest is padding) instead of sets packed one after another. For
            families whose tokens do not show a task switch (bandits: every pull looks alike), so
            that no context mixes two tasks and every context starts as an evaluation trial does.
        permute_observations: the share of training sequences (0 to 1; default 0) in which each
            task's observations are written through a random permutation of the observation tokens
            (one per task and sequence; a tile's success and failure tokens move together), so that
            a token names a tile only within its context: what the model knows of a tile it must
            read from the context. The task augmentation of Kirsch et al. 2022 in discrete form; it
            also trains every observation token, those of tiles only larger maps have included.
            Needs a format that writes an observation as one token (``compact``,
            ``compact_outcome``). Evaluation is unchanged.
        seq_len: tokens per training sequence.
        batch_size: sequences per device batch.
        num_workers: DataLoader worker processes.
        build_workers: processes that build a missing dataset (its bytes do not depend on it);
            ``null`` = every CPU this process may use.
        eval_split: ``heldout`` (same distribution as training) or ``ood`` (Frozen Lake: 6..7 x 6..7
            maps; Dark Room: a larger room).
        eval_maps: how many tasks of the split to evaluate on (Frozen Lake reserves 200 maps of each
            split; Dark Room holds out ``size**2 - train_goals`` goals).
        eval_skip: the first task of the split to evaluate on (default 0). With ``eval_skip`` 50 and
            ``eval_maps`` 100 (``conf/experiment/eval_selection.yaml``) the evaluation plays other
            held-out tasks than the 50 that results are reported on, so a recipe can be chosen on
            tasks it is not reported on.
        eval_map_file: Frozen Lake: a JSON list of maps (lists of row strings) to evaluate on instead.

    Every argument is checked here; the map file and ``seq_len`` against the longest possible
    episode are checked once the model's serializer is handed over (``set_serializer``), before
    the dataset is built or a step is trained.

    ``fit --ckpt_path ...`` continues the replay stream where the checkpoint left it: the stream
    skips the ``global_step x accumulate_grad_batches`` batches this rank already trained on.
    """

    # The replay stream's class: a subclass adds batch fields of its own (icrl_lightning.experimental).
    stream_class: type[ReplayStream] = ReplayStream

    def __init__(
        self,
        data_dir: str = "data",
        seed: int = 0,
        split_seed: int = 0,
        env: ProblemFamily = lazy_instance(FrozenLake),  # noqa: B008 - jsonargparse's lazy default
        behaviour: Behaviour = lazy_instance(QLearning),  # noqa: B008
        num_train_maps: int = 250,
        episodes_per_map: int = 200,
        set_size_min: int = 20,
        set_size_max: int = 40,
        quality: str = "medium",
        set_order: str = "random",
        set_per_sequence: bool = False,
        permute_observations: float = 0.0,
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        build_workers: int | None = None,
        eval_split: str = "heldout",
        eval_maps: int = 50,
        eval_skip: int = 0,
        eval_map_file: str | None = None,
    ):
        super().__init__()
        self.env = config_object(env, ProblemFamily, "data.env")
        self.behaviour = config_object(behaviour, Behaviour, "data.behaviour")
        # Plain values only (class path + arguments), so a checkpoint loads with weights_only=True.
        self.save_hyperparameters(ignore=["env", "behaviour"])
        self.hparams["env"] = object_config(self.env)
        self.hparams["behaviour"] = object_config(self.behaviour)
        check_range("data.seed", seed, 0, None, why="numpy seeds are non-negative")
        check_range("data.split_seed", split_seed, 0, None, why="numpy seeds are non-negative")
        check_range("data.num_train_maps", num_train_maps, 1, None)
        check_range("data.episodes_per_map", episodes_per_map, 1, None)
        check_range("data.set_size_min", set_size_min, 1, None)
        check_range("data.set_size_max", set_size_max, set_size_min, None, why="at least data.set_size_min")
        check_choice("data.quality", quality, ("high", "medium", "low"))
        check_choice("data.set_order", set_order, SET_ORDERS)
        check_range("data.permute_observations", permute_observations, 0, 1, why="a share of the sequences")
        check_range("data.seq_len", seq_len, 1, None)
        check_range("data.batch_size", batch_size, 1, None)
        check_range("data.num_workers", num_workers, 0, None)
        if build_workers is not None:
            check_range("data.build_workers", build_workers, 1, None)
        check_choice("data.eval_split", eval_split, EVAL_SPLITS)
        check_range("data.eval_maps", eval_maps, 1, RESERVED_EVAL_MAPS,
                    why=f"{RESERVED_EVAL_MAPS} maps of each split are reserved for evaluation")
        check_range("data.eval_skip", eval_skip, 0, RESERVED_EVAL_MAPS - 1,
                    why=f"{RESERVED_EVAL_MAPS} maps of each split are reserved for evaluation")
        if eval_skip and eval_map_file:
            raise InputError(f"data.eval_skip={eval_skip} picks tasks of data.eval_split; data.eval_map_file "
                             f"{eval_map_file!r} gives the tasks itself: set one of them")
        if Path(data_dir).is_file():
            raise InputError(f"data.data_dir={data_dir!r} is a file: give a folder (datasets are built under it)")
        self.serializer: Serializer | None = None
        self.batch_fields: frozenset[str] = frozenset()
        self._file_maps: list[Task] | None = self.env.load_task_file(eval_map_file) if eval_map_file else None
        self.eval_maps: list[Task] = []

    def set_serializer(self, serializer: Serializer, batch_fields=frozenset()) -> ReplayDataModule:
        """Hand over the model's serializer (and the extra batch fields its objective reads);
        checks what depends on it (tile counts, ``seq_len`` against the longest episode)."""
        self.serializer, self.batch_fields = serializer, frozenset(batch_fields)
        h = self.hparams
        sizes = {"data.env.max_size" if isinstance(self.env, FrozenLake) else "data.env":
                 self.env.largest_observations("train")}
        if self._file_maps:
            sizes["data.eval_map_file"] = max(self.env.n_observations(m) for m in self._file_maps)
        elif h.eval_split == "ood":
            sizes["data.eval_split=ood"] = self.env.largest_observations("ood")
        key, biggest = max(sizes.items(), key=lambda kv: kv[1])
        if serializer.actions != tuple(self.env.actions):
            raise InputError(f"data.env: the {type(self.env).__name__} family's actions {list(self.env.actions)} are "
                             f"not the model's {list(serializer.actions)} (model.env is linked to data.env)")
        if biggest > serializer.max_tiles:
            noun = "maps" if isinstance(self.env, FrozenLake) else "tasks"
            raise InputError(f"{key}: {noun} of {biggest} tiles, but the model's tokenizer writes at most "
                             f"{serializer.max_tiles} tiles: raise model.backbone.max_tiles to {biggest}")
        if h.permute_observations:
            self._observation_ids()
        need = self.longest_episode_tokens()
        check_range("data.seq_len", h.seq_len, need, None,
                    why=f"an episode of data.env.max_episode_steps={self.env.max_episode_steps} steps is {need} "
                        f"tokens in the {serializer.fmt.name} format")
        return self

    def _serializer(self) -> Serializer:
        if self.serializer is None:
            raise RuntimeError("ReplayDataModule needs the model's serializer: call "
                               "datamodule.set_serializer(model.serializer, model.batch_fields) first "
                               "(python -m icrl_lightning does)")
        return self.serializer

    # --- the offline dataset -------------------------------------------------------------------
    def generation_settings(self) -> dict:
        """Everything that decides the dataset's episodes (hashed into its folder name)."""
        h = self.hparams
        settings = {"version": 1, "seed": h.seed, "num_train_maps": h.num_train_maps,
                    "episodes_per_map": h.episodes_per_map, **self.behaviour.settings(), **self.env.settings()}
        if h.split_seed != h.seed:  # the training maps exclude the evaluation maps of split_seed
            settings["split_seed"] = h.split_seed
        return settings

    @property
    def dataset_dir(self) -> Path:
        return dataset.dataset_folder(self.hparams.data_dir, self.generation_settings())

    def behaviour_run(self, rows: Task, map_id: int, seed: list[int]) -> list[Episode]:
        """The behaviour learner's episodes on one task with this module's settings (the dataset's;
        the diagnostics also run it on held-out tasks, with their own seeds)."""
        return self.behaviour.run(self.env, rows, map_id, self.hparams.episodes_per_map, seed)

    def encoded_maps(self) -> tuple[dict[int, EpisodeTable], dict[int, np.ndarray]]:
        """The dataset's episodes encoded, as one ``EpisodeTable`` per map, and their quality
        weights; read one shard at a time, so memory holds the tables and one shard's records."""
        s, quality = self._serializer(), self.hparams.quality
        tables, weights = {}, {}
        for shard in dataset.iter_shards(self.dataset_dir):
            by_map: dict[int, list[Episode]] = {}
            for e in shard:
                by_map.setdefault(e.map_id, []).append(e)
            for m, eps in by_map.items():
                tables[m] = EpisodeTable([s.encode(e) for e in eps])
                weights[m] = quality_weights(eps, quality)
        return tables, weights

    def prepare_data(self) -> None:
        """Build the dataset when absent (only ``fit`` needs it: ``validate`` builds nothing)."""
        if self.trainer is not None and self.trainer.state.fn not in (None, TrainerFn.FITTING):
            return
        h = self.hparams
        splits = self.env.splits(h.seed, h.num_train_maps, h.split_seed)
        play = _Play(self.behaviour, self.env, h.episodes_per_map, h.seed)
        dataset.build(self.dataset_dir, self.generation_settings(), splits.train, play,
                      workers=h.build_workers or dataset.default_workers())

    def load_episodes(self) -> list[Episode]:
        return dataset.load(self.dataset_dir)

    def longest_episode_tokens(self) -> int:
        """Tokens of the longest episode the data can hold: ``max_episode_steps`` steps on the
        largest training task, the family's most rewards (a reward or a truncation marker at the
        end, whichever is longer)."""
        env = self.env
        return self._serializer().longest_episode_tokens(env.max_episode_steps, env.largest_observations("train"),
                                                         env.rewards_per_episode)

    # --- streams --------------------------------------------------------------------------------
    def heldout_maps(self, split: str = "heldout") -> list[Task]:
        """The reserved evaluation tasks of ``split`` (``heldout`` or ``ood``), never trained on."""
        splits = self.env.splits(self.hparams.split_seed, 0)
        return splits.heldout if split == "heldout" else splits.ood

    def setup(self, stage: str) -> None:
        h = self.hparams
        if self._file_maps:
            self.eval_maps = self._file_maps
            return
        tasks = self.heldout_maps(h.eval_split)
        if len(tasks) < h.eval_skip + h.eval_maps:
            raise InputError(f"data.eval_skip={h.eval_skip} + data.eval_maps={h.eval_maps}: the "
                             f"{type(self.env).__name__} family has only {len(tasks)} {h.eval_split} tasks")
        self.eval_maps = tasks[h.eval_skip: h.eval_skip + h.eval_maps]

    def encode(self, by_map: dict[int, list[Episode]]) -> dict[int, list[EncodedEpisode]]:
        s = self._serializer()
        return {m: [s.encode(e) for e in eps] for m, eps in by_map.items()}

    def train_stream(self, num_sequences: int, rank: int = 0, world_size: int = 1,
                     skip_batches: int = 0) -> ReplayStream:
        return self.stream(*self.encoded_maps(), num_sequences, rank, world_size, skip_batches)

    def optimal_actions(self) -> dict[int, np.ndarray]:
        """Training map id -> the family's ``optimal_actions`` of that task (the batch field
        ``optimal``, read by ``model.objective: dpt``)."""
        h = self.hparams
        train = self.env.splits(h.seed, h.num_train_maps, h.split_seed).train
        return {m: self.env.optimal_actions(task) for m, task in enumerate(train)}

    def stream(self, episodes: dict, weights: dict[int, np.ndarray], num_sequences: int, rank: int = 0,
               world_size: int = 1, skip_batches: int = 0, fields=None) -> ReplayStream:
        """A replay stream over ``episodes`` (encoded, by map) with this module's set, packing and
        quality settings; ``fields``: the batch fields (default: those the objective reads)."""
        h = self.hparams
        fields = self.batch_fields if fields is None else fields
        return self.stream_class(episodes, weights, h.seq_len, self._serializer().pad_id, num_sequences,
                                 (h.set_size_min, h.set_size_max), h.seed, rank, world_size, h.batch_size,
                                 h.set_order, skip_batches, fields=fields, history=self.behaviour.history_length,
                                 optimal_actions=self.optimal_actions() if "optimal" in fields else None,
                                 set_per_sequence=h.set_per_sequence,
                                 observation_ids=self._observation_ids() if h.permute_observations else None,
                                 permute_share=float(h.permute_observations), n_actions=len(self.env.actions))

    def _observation_ids(self) -> np.ndarray:
        try:
            return self._serializer().observation_ids()
        except ValueError as err:
            raise InputError(f"data.permute_observations: {err}") from None

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if t.max_steps is None or t.max_steps < 1:
            raise InputError("trainer.max_steps must be set (>= 1): the replay stream is sized from it")
        num_sequences = t.max_steps * t.accumulate_grad_batches * self.hparams.batch_size
        # A resumed fit has its step counter restored by now: continue the stream after the batches
        # already trained on (checkpoints are taken after an optimizer step).
        skip = t.global_step * t.accumulate_grad_batches
        if skip:
            log.info("resuming the replay stream after %d batches per rank", skip)
        stream = self.train_stream(num_sequences, t.global_rank, t.world_size, skip)
        return ReplayLoader(stream, self._layout(), batch_size=self.hparams.batch_size,
                            num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        # One batch holds every map of this rank: the agent plays them in lock-step.
        return DataLoader(MapList(self.eval_maps), batch_size=len(self.eval_maps), collate_fn=_as_list)

    def _layout(self) -> dict:
        """What decides which batch comes at which step."""
        h, t = self.hparams, self.trainer
        keys = ("seed", "seq_len", "batch_size", "num_workers", "set_size_min", "set_size_max", "quality",
                "set_order", "set_per_sequence", "permute_observations")
        return {"dataset": self.dataset_dir.name, **{k: h[k] for k in keys}, "world_size": t.world_size,
                "accumulate_grad_batches": t.accumulate_grad_batches}


class _Play:
    """``play(task, map_id)``: the behaviour's episodes on one training task, seeded by its id (a
    plain object, so that dataset builds in worker processes can take it)."""

    def __init__(self, behaviour: Behaviour, env: ProblemFamily, episodes: int, seed: int):
        self.behaviour, self.env, self.episodes, self.seed = behaviour, env, episodes, seed

    def __call__(self, task: Task, map_id: int) -> list[Episode]:
        return self.behaviour.run(self.env, task, map_id, self.episodes, [self.seed, 3, map_id])
