"""Data for the Uni-Med recipe: the common `Sample`, loaders for the real public formats (`loaders`), the
built-in synthetic multi-task set (`synthetic`), a config's splits (`splits`), image preprocessing (`images`),
multi-task batch samplers (`mixing`) and IMAX-style image-centric merging and statistics (`imax`).

May import: the core (`cmoe`) and the recipe's base modules (tasks, prompts, boxes, config, original).
"""

from cmoe.reference_models.unimed.data.sample import ImageLike, Sample, image_identity

__all__ = ["ImageLike", "Sample", "image_identity"]
