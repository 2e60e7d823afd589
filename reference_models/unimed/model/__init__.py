"""The Uni-Med model and its inputs: assembly of encoder → connector → LLM (`assembly`), the tokenizer, the
collator that turns samples into batches, the recipe checkpoint on disk, and the model at paper scale (meta
build, parameter counts, memory estimate).

May import: the core (`cmoe`), `cmoe.plugins`, the recipe's base modules (tasks, prompts, boxes, config,
original) and `data`.
"""
