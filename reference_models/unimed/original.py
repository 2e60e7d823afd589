"""Names and conventions of the original Uni-Med code (tsinghua-msiip/Uni-Med) that the recipe must match.

The original keeps one learned task token per task in the order ``ORIGINAL_TASKS`` and its hard router sends
task ``t`` to expert ``ORIGINAL_TASKS.index(t)``; the recipe names the same five image tasks differently and
orders them as `IMAGE_TASKS` (the connector's task ids). `RECIPE_TO_ORIGINAL` links the two, so weights and
routing carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from cmoe.errors import CMoEError

ORIGINAL_TASKS: tuple[str, ...] = ("vqa", "refer", "identify", "caption", "cls")
"""The original's task list (``self.tasks`` in ``uni_med/models/uni_med.py``): task tokens and hard routing."""

RECIPE_TO_ORIGINAL: dict[str, str] = {"vqa": "vqa", "report": "caption", "rec": "refer", "reg": "identify",
                                      "cls": "cls"}
"""The recipe's image-task names → the original's (its ``[caption]``, ``[refer]``, ``[identify]`` identifiers)."""


def original_task_experts(tasks: Sequence[str]) -> list[int]:
    """The expert the original's hard router picks for each of `tasks` (recipe names, in task-id order)."""
    unknown = [task for task in tasks if task not in RECIPE_TO_ORIGINAL]
    if unknown:
        raise CMoEError(f"tasks: expected image tasks of the recipe ({', '.join(RECIPE_TO_ORIGINAL)}), got "
                        f"{unknown}; the original's hard routing is defined for those five only")
    return [ORIGINAL_TASKS.index(RECIPE_TO_ORIGINAL[task]) for task in tasks]


ORIGINAL_EVAL_DATASETS: dict[str, str] = {
    "slake_vqa": "slakevqa_en", "pathvqa": "path_vqa", "slake_rec": "ref_slake", "samed2d_rec": "ref_sa_med",
    "slake_reg": "invref_slake", "samed2d_reg": "invref_sa_med", "mimic_cxr": "mimic_caption",
    "medpix": "medpix_single", "dermamnist": "medmnist_2d_derma", "organsmnist": "medmnist_2d_organs"}
"""The recipe's dataset loaders → the ``--dataset`` names of the original's ``eval_*.py`` scripts, which score each
dataset on its own. MedQA and PubMedQA have none: the original evaluates no text QA."""
