"""Scoring under two protocols: the original code's metrics per dataset (`original_protocol`) and ours per task
(`metrics`; report metrics through the COCO caption evaluation, `coco_caption`), and evaluation of a trained model
or checkpoint on every task (`evaluate`).

May import: the core, `cmoe.plugins`, the recipe's base modules, `data` and `model`.
"""
