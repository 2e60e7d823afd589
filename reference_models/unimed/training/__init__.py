"""Training: the loop with exact resume and periodic analysis (`train`), DDP/FSDP (`distributed`), and the
pretraining of the tiny encoder and LLM the recipe ships (`pretrain`).

May import: the core, `cmoe.plugins`, the recipe's base modules, `data`, `model`, `evaluation` and `analysis`.
"""
