"""Measured comparisons across seeds: the experiment runner (`experiment`), its task sets and testbeds
(`experiment_tasks`), paired statistics (`experiment_stats`) and the report (`experiment_report`).

May import: every layer below it (base modules, `data`, `model`, `evaluation`, `analysis`, `training`).
"""
