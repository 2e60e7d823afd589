"""The tug-of-war analysis: the connector's parameter groups and per-task gradients (`gradients`), task-gradient
conflict and magnitude, parameter statistics and routing per task (`measures`), the JSON report (`report`), its
plots (`plots`), and the probe that measures them on a model or checkpoint (`analyze`), live during training or
afterwards.

May import: the core, `cmoe.plugins`, the recipe's base modules, `data`, `model` and `evaluation`.
"""
