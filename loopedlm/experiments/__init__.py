"""Experiments: `sweep` (grids of runs), `report` (the paper's tables and figures from a
sweep), `plot` (stability figures of runs) and `info` (sizes and FLOPs of a model)."""
