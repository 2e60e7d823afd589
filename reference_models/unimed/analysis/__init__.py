"""The tug-of-war analysis: task-gradient conflict and magnitude, routing per task, plots (`tug_of_war`), and the
probe that measures them on a model or checkpoint (`analyze`), live during training or afterwards.

May import: the core, `cmoe.plugins`, the recipe's base modules, `data`, `model` and `evaluation`.
"""
