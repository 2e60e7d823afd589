"""The paper-scale bridge: the paper's model at full size without its weights (`scale`), one training step of
it on a GPU (`paper_step`) and conversion of the original Uni-Med code's checkpoints into connectors and recipe
checkpoints (`convert`).

May import: every layer below it (base modules, `data`, `model`, `evaluation`, `analysis`, `training`).
"""
