"""The paper-scale bridge: one training step of the paper's configuration (`paper_step`) and conversion of the
original Uni-Med code's checkpoints into connectors and recipe checkpoints (`convert`).

May import: every layer below it (base modules, `data`, `model`, `evaluation`, `analysis`, `training`).
"""
