"""Problem families. Frozen Lake is the paper's."""

from icrl_lightning.envs.frozen_lake import (
    ACTIONS,
    FrozenLake,
    MapSplits,
    generate_map,
    generate_maps,
    load_map_file,
    load_stitching_file,
    make_env,
    make_splits,
    paper_schedule,
    shortest_path_actions,
    validate_map,
)

__all__ = [
    "ACTIONS",
    "FrozenLake",
    "MapSplits",
    "generate_map",
    "generate_maps",
    "load_map_file",
    "load_stitching_file",
    "make_env",
    "make_splits",
    "paper_schedule",
    "shortest_path_actions",
    "validate_map",
]
