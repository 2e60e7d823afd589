"""The recipe's data from its config: the built-in synthetic set or real datasets under local roots."""

from __future__ import annotations

from cmoe.errors import expect
from cmoe.reference_models.unimed.config import DataSection
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.text_processing import using_text_processor


def load_split(section: DataSection, split: str, text_processor: str = "cmoe") -> list[Sample]:
    """The entries of `split` (``train`` or the eval split): generated, or read by each dataset's loader with
    `text_processor` (``prompts.text_processor``: ``original`` or ``cmoe``, see `text_processing`) applied to
    questions, object names and answers."""
    if section.synthetic is not None:
        from cmoe.reference_models.unimed.data.synthetic import SyntheticConfig, generate_splits

        options = dict(section.synthetic)
        split_options = {key: options.pop(key) for key in ("eval_fraction", "eval_images") if key in options}
        if "tasks" in options:
            options["tasks"] = tuple(options["tasks"])
        splits = generate_splits(SyntheticConfig(**options), **split_options)
        expect(split in splits, "split", f"one of {sorted(splits)} for the synthetic set", repr(split))
        return splits[split]
    from cmoe.reference_models.unimed.data.loaders import load_dataset

    samples: list[Sample] = []
    with using_text_processor(text_processor):
        for entry in section.datasets:
            for sample in load_dataset(entry.name, entry.root, split, **entry.options):
                sample.source = sample.source or entry.name
                samples.append(sample)
    return samples


def by_task(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Entries grouped by task, in first-seen order."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.task, []).append(sample)
    return groups
