"""Environment families. Frozen Lake is the paper's."""

from icrl_lightning.envs.frozen_lake import (
    ACTIONS,
    STITCHING_MAP,
    MapSplits,
    generate_map,
    generate_maps,
    make_env,
    make_splits,
    shortest_path_actions,
    validate_map,
)

__all__ = [
    "ACTIONS",
    "STITCHING_MAP",
    "MapSplits",
    "generate_map",
    "generate_maps",
    "make_env",
    "make_splits",
    "shortest_path_actions",
    "validate_map",
]
