"""Problem families (``family.ProblemFamily``): Frozen Lake (the paper's), Dark Room, Dark
Key-to-Door and Bernoulli bandits."""

from icrl_lightning.envs.bandit import BernoulliBandit
from icrl_lightning.envs.dark_room import DarkRoom
from icrl_lightning.envs.family import ProblemFamily, Task, TaskSplits
from icrl_lightning.envs.frozen_lake import (
    ACTIONS,
    FrozenLake,
    MapSplits,
    generate_map,
    generate_maps,
    load_map_file,
    make_env,
    make_splits,
    paper_schedule,
    shortest_path_actions,
    validate_map,
)
from icrl_lightning.envs.key_to_door import DarkKeyToDoor
from icrl_lightning.envs.stitching import load_stitching_file, load_stitching_layouts, make_layouts

__all__ = [
    "ACTIONS",
    "BernoulliBandit",
    "DarkKeyToDoor",
    "DarkRoom",
    "FrozenLake",
    "MapSplits",
    "ProblemFamily",
    "Task",
    "TaskSplits",
    "generate_map",
    "generate_maps",
    "load_map_file",
    "load_stitching_file",
    "load_stitching_layouts",
    "make_env",
    "make_layouts",
    "make_splits",
    "paper_schedule",
    "shortest_path_actions",
    "validate_map",
]
