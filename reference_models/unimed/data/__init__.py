"""Data for the Uni-Med recipe: the common `Sample`, loaders for the real public formats (`loaders`), the
built-in synthetic multi-task set (`synthetic`), multi-task batch samplers (`mixing`) and IMAX-style
image-centric merging and statistics (`imax`)."""

from cmoe.reference_models.unimed.data.sample import ImageLike, Sample, image_identity

__all__ = ["ImageLike", "Sample", "image_identity"]
