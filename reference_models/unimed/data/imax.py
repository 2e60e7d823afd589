"""Image-centric multi-annotation data (IMAX, arXiv 2504.09967): merge, measure, decentralise.

IMAX gives every image annotations for many tasks; the usual decentralised mix (DMAX) gives each image one or
two. This module

- merges entries of different task datasets by image (`merge_by_image`), by ``image_id`` or by the hash of the
  image file/array when datasets name the same image differently;
- measures a mix the way the IMAX paper does (`annotation_stats`, `format_stats`): images, entries, tasks per
  image and entries per image (mean and histogram), entries and images per task;
- derives a DMAX-like set from an IMAX-like one (`to_dmax`) and cuts a set to an entry budget by whole images
  (`subsample_images`), for comparisons at a fixed budget.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from cmoe.errors import UnknownNameError, expect
from cmoe.reference_models.unimed.data.sample import Sample, image_identity

Datasets = Union[Mapping[str, Sequence[Sample]], Sequence[Sample]]
"""Entries as one list, or as task datasets by name (the name becomes ``source`` where an entry has none)."""

Identity = Union[str, Callable[[Sample], Union[str, None]]]
"""How to tell which image an entry shows: ``"image_id"``, ``"hash"`` or a function of the entry."""

IDENTITIES = ("image_id", "hash")


@dataclass
class ImageGroup:
    """All entries that show one image, whatever dataset or task they came from."""

    key: str
    entries: list[Sample] = field(default_factory=list)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The distinct tasks this image is annotated for, sorted."""
        return tuple(sorted({entry.task for entry in self.entries}))

    @property
    def sources(self) -> tuple[str, ...]:
        """The distinct datasets its entries came from, sorted."""
        return tuple(sorted({entry.source for entry in self.entries}))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class MergedImages:
    """Entries merged by image: ``images`` maps each image key to its `ImageGroup` (in order of first
    appearance); ``text_only`` holds the entries without an image, which belong to no image."""

    images: dict[str, ImageGroup]
    text_only: list[Sample]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageGroup]:
        return iter(self.images.values())

    def __getitem__(self, key: str) -> ImageGroup:
        return self.images[key]

    @property
    def num_entries(self) -> int:
        """All entries, with an image or not."""
        return sum(len(group) for group in self) + len(self.text_only)

    def samples(self, set_ids: bool = True) -> list[Sample]:
        """All entries, image by image then the text-only ones; with ``set_ids`` each imaged entry's
        ``image_id`` is set to its merge key (copies, the inputs are untouched), so hash-merged images share
        one id for `mixing.ImageCentricSampler`."""
        out: list[Sample] = []
        for group in self:
            for entry in group.entries:
                keep = not set_ids or entry.image_id == group.key
                out.append(entry if keep else dataclasses.replace(entry, image_id=group.key))
        return out + list(self.text_only)


def _flatten(datasets: Datasets) -> list[Sample]:
    if isinstance(datasets, Mapping):
        out = []
        for name, entries in datasets.items():
            out.extend(entry if entry.source else dataclasses.replace(entry, source=name) for entry in entries)
        return out
    expect(isinstance(datasets, Sequence), "datasets", "a list of Samples or a dict of them by dataset name",
           type(datasets).__name__)
    return list(datasets)


def _identity_function(identity: Identity) -> Callable[[Sample], str | None]:
    if callable(identity):
        return identity
    if identity not in IDENTITIES:
        raise UnknownNameError("identity", str(identity), IDENTITIES)
    cache: dict[Any, str | None] = {}

    def by_hash(sample: Sample) -> str | None:
        image = sample.image
        if image is None:
            return None
        key = ("array", id(image)) if isinstance(image, np.ndarray) else ("path", str(image))
        if key not in cache:
            cache[key] = image_identity(image)
        return cache[key]

    if identity == "hash":
        return by_hash
    return lambda sample: sample.image_id if sample.image_id is not None else by_hash(sample)


def merge_by_image(datasets: Datasets, identity: Identity = "image_id") -> MergedImages:
    """Group entries of all datasets by the image they show, so each image carries every task it has.

    ``identity="image_id"`` uses ``Sample.image_id`` (an imaged entry without one falls back to its hash);
    ``"hash"`` uses the SHA-1 of the image file or array (`image_identity`), for datasets that name the same
    image differently; a function of the entry may return any key (None: no image). Entries without an image
    go to ``text_only``.
    """
    key_of = _identity_function(identity)
    images: dict[str, ImageGroup] = {}
    text_only: list[Sample] = []
    for sample in _flatten(datasets):
        key = key_of(sample) if sample.image is not None else None
        if key is None:
            text_only.append(sample)
        else:
            images.setdefault(key, ImageGroup(key)).entries.append(sample)
    return MergedImages(images, text_only)


def _merged(data: Datasets | MergedImages, identity: Identity) -> MergedImages:
    return data if isinstance(data, MergedImages) else merge_by_image(data, identity)


def _distribution(values: Sequence[int]) -> dict[str, Any]:
    counts = Counter(values)
    return {
        "mean": float(np.mean(values)) if values else 0.0,
        "median": float(np.median(values)) if values else 0.0,
        "max": max(values, default=0),
        "histogram": {k: counts[k] for k in sorted(counts)},
    }


def annotation_stats(data: Datasets | MergedImages, identity: Identity = "image_id") -> dict[str, Any]:
    """The IMAX paper's statistics of a mix (IMAX-like or DMAX-like).

    Keys: ``images``; ``entries`` (all), ``image_entries``, ``text_only_entries``; ``tasks`` (sorted);
    ``tasks_per_image`` and ``entries_per_image``, each ``{mean, median, max, histogram}`` with the histogram
    mapping a count to the number of images having it (over images only, text-only entries excluded);
    ``entries_per_task`` and ``entries_per_source`` (all entries); ``images_per_task``; and
    ``task_cooccurrence``: ``{task_a: {task_b: images annotated for both}}`` (the diagonal is
    ``images_per_task``).
    """
    merged = _merged(data, identity)
    groups = list(merged)
    entries = [entry for group in groups for entry in group.entries] + merged.text_only
    task_sets = [group.tasks for group in groups]
    tasks = sorted({entry.task for entry in entries})
    image_tasks = sorted({task for task_set in task_sets for task in task_set})
    cooccurrence = {a: {b: 0 for b in image_tasks} for a in image_tasks}
    for task_set in task_sets:
        for a in task_set:
            for b in task_set:
                cooccurrence[a][b] += 1
    return {
        "images": len(groups),
        "entries": len(entries),
        "image_entries": len(entries) - len(merged.text_only),
        "text_only_entries": len(merged.text_only),
        "tasks": tasks,
        "tasks_per_image": _distribution([len(task_set) for task_set in task_sets]),
        "entries_per_image": _distribution([len(group) for group in groups]),
        "entries_per_task": dict(sorted(Counter(entry.task for entry in entries).items())),
        "entries_per_source": dict(sorted(Counter(entry.source for entry in entries).items())),
        "images_per_task": {task: cooccurrence[task][task] for task in image_tasks},
        "task_cooccurrence": cooccurrence,
    }


def format_stats(stats: Mapping[str, Any], title: str | None = None) -> str:
    """`annotation_stats` as Markdown: a summary table, then entries and images per task, then the
    tasks-per-image and entries-per-image histograms."""
    tpi, epi = stats["tasks_per_image"], stats["entries_per_image"]
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| statistic | value |", "|---|---:|",
        f"| images | {stats['images']:,} |",
        f"| entries | {stats['entries']:,} |",
        f"| entries with an image | {stats['image_entries']:,} |",
        f"| text-only entries | {stats['text_only_entries']:,} |",
        f"| tasks | {len(stats['tasks'])} |",
        f"| tasks per image (mean / median / max) | {tpi['mean']:.2f} / {tpi['median']:g} / {tpi['max']} |",
        f"| entries per image (mean / median / max) | {epi['mean']:.2f} / {epi['median']:g} / {epi['max']} |",
        "", "| task | entries | images |", "|---|---:|---:|",
    ]
    for task in stats["tasks"]:
        images = stats["images_per_task"].get(task, 0)
        lines.append(f"| {task} | {stats['entries_per_task'].get(task, 0):,} | {images:,} |")
    for name, dist in (("tasks", tpi), ("entries", epi)):
        total = max(stats["images"], 1)
        lines += ["", f"| {name} per image | images | share |", "|---:|---:|---:|"]
        lines += [f"| {k} | {n:,} | {n / total:.1%} |" for k, n in dist["histogram"].items()]
    return "\n".join(lines) + "\n"


def to_dmax(data: Datasets | MergedImages, tasks_per_image: int = 1, seed: int = 0,
            identity: Identity = "image_id") -> list[Sample]:
    """A decentralised (DMAX-like) version of an IMAX-like set: each image keeps only ``tasks_per_image`` of its
    tasks, chosen uniformly at random from ``seed``, with all its entries for those tasks; images with fewer
    tasks keep them all, text-only entries are kept. Entries are returned image by image, in input order.

    The result has fewer entries than the input. To compare IMAX and DMAX at a fixed budget, either train both
    for the same number of steps and batch size (the samplers are endless, so both see the same number of
    entries, DMAX's more often each), or hold the entry count fixed too by cutting the IMAX-like set to the
    DMAX size with `subsample_images` (whole images, so its density of tasks per image is kept).
    """
    expect(isinstance(tasks_per_image, int) and tasks_per_image >= 1, "tasks_per_image", "a positive int",
           repr(tasks_per_image))
    merged = _merged(data, identity)
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for group in merged:
        tasks = group.tasks
        keep = set(tasks) if len(tasks) <= tasks_per_image else {
            tasks[i] for i in rng.choice(len(tasks), tasks_per_image, replace=False).tolist()}
        out.extend(entry for entry in group.entries if entry.task in keep)
    return out + list(merged.text_only)


def subsample_images(data: Datasets | MergedImages, max_entries: int, seed: int = 0,
                     identity: Identity = "image_id") -> list[Sample]:
    """Whole images, in an order shuffled from ``seed``, for as long as their entries fit in ``max_entries``
    (an image that would overflow is skipped and smaller ones after it still tried); text-only entries are not
    counted and are kept. Cuts a set to an entry budget without changing how densely images are annotated."""
    expect(isinstance(max_entries, int) and max_entries >= 0, "max_entries", "a non-negative int",
           repr(max_entries))
    merged = _merged(data, identity)
    groups = list(merged)
    chosen, used = [], 0
    for i in np.random.default_rng(seed).permutation(len(groups)).tolist():
        if used + len(groups[i]) <= max_entries:
            chosen.append(i)
            used += len(groups[i])
    return [entry for i in sorted(chosen) for entry in groups[i].entries] + list(merged.text_only)
