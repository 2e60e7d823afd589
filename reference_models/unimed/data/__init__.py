"""Data for the Uni-Med recipe: the common `Sample`, loaders for the real public formats, the built-in
synthetic multi-task set and multi-task mixing."""

from cmoe.reference_models.unimed.data.sample import ImageLike, Sample, image_identity

__all__ = ["ImageLike", "Sample", "image_identity"]
