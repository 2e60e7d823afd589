"""``cmoe unimed check-data``: can a config's data be read? Per dataset: the layout found, the entries of each
split, and what is missing with the file that would fix it; then the mix the ``task_ratio`` sampler draws."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmoe.errors import CMoEError, unset_variables
from cmoe.reference_models.unimed.config import DataSection, ModelSection
from cmoe.reference_models.unimed.data.loaders import (
    LAYOUT_CHOICES,
    LAYOUTS,
    Layout,
    MissingDataError,
    detect_layout,
    layout_markers,
    load_dataset,
)
from cmoe.reference_models.unimed.data.sample import Sample


@dataclass
class SplitCheck:
    """One split of one dataset: its number of entries, or why it cannot be read (and the path that would fix it,
    when a file or folder is missing)."""

    count: int | None = None
    problem: str | None = None
    missing: Path | None = None
    other_layout: tuple[str, Path] | None = None
    """For a folder in neither of a dataset's two layouts: the other layout and the file it misses."""

    @property
    def summary(self) -> str:
        """``missing <path>`` when a file or folder is missing, else the whole problem (empty when none)."""
        if self.missing is None:
            return self.problem or ""
        if self.other_layout is None:
            return f"missing {self.missing}"
        return f"missing {self.missing} (or {self.other_layout[1]}, {self.other_layout[0]} layout)"


@dataclass
class DatasetCheck:
    """One ``data.datasets`` entry: where it is read from, the layout found there, and each split."""

    name: str
    root: str
    layout: Layout | None
    splits: dict[str, SplitCheck] = field(default_factory=dict)


@dataclass
class DataCheck:
    """The check of a config's data section (`check_data`)."""

    train_split: str
    eval_split: str
    datasets: list[DatasetCheck]
    mix: dict[str, float] = field(default_factory=dict)
    """Each ``task_ratio`` source's share of the batches."""
    mix_members: dict[str, dict[str, float]] = field(default_factory=dict)
    """For a source that draws several datasets: each one's share of its entries."""
    mix_problem: str | None = None
    synthetic: bool = False

    def train_problems(self) -> list[str]:
        """What stops training: a dataset whose training split cannot be read or is empty, or a mix that does not
        fit the data."""
        problems = [f"{d.name} [{split}]: {s.summary}" for d in self.datasets
                    for split, s in d.splits.items() if split == self.train_split and s.problem]
        return problems + ([f"mix: {self.mix_problem}"] if self.mix_problem else [])

    @property
    def can_train(self) -> bool:
        """True when every dataset's training split reads with entries and the mix fits them."""
        return not self.train_problems()


def _missing(name: str, root: str, split: str, options: dict, error: MissingDataError) -> SplitCheck:
    """The check of a split with a missing file. When the dataset has two layouts, no layout is forced and the
    folder (which exists) shows neither, so that detection fell back to the release's, the original's file is
    named first and the release's beside it."""
    check = SplitCheck(problem=str(error), missing=error.path)
    if "layout" in options:
        return check
    detected = _layout(name, root, split, options)
    if detected is None or detected.original:
        return check
    markers = layout_markers(name, root, split, **options)
    if not markers or any(path.exists() for path in markers.values()):
        return check
    original = next(choice.name for choice in LAYOUT_CHOICES[name] if choice.original)
    other = next(layout for layout in markers if layout != original)
    check.missing, check.other_layout = markers[original], (other, markers[other])
    return check


def _check_split(name: str, root: str, split: str, options: dict) -> tuple[SplitCheck, list[Sample]]:
    try:
        samples = load_dataset(name, root, split, **options)
    except MissingDataError as error:
        return _missing(name, root, split, options, error), []
    except CMoEError as error:
        return SplitCheck(problem=str(error)), []
    if not samples:
        return SplitCheck(0, f"the {split!r} split has no entries under {root}; check the files against the "
                             "layout (e.g. SLAKE keeps English questions only)"), []
    return SplitCheck(len(samples)), samples


def _layout(name: str, root: str, split: str, options: dict) -> Layout | None:
    """The layout found under `root`, or None when the root is not a folder or the options are wrong."""
    if not Path(root).expanduser().is_dir():
        return None
    try:
        return detect_layout(name, root, split, **options)
    except CMoEError:
        return None


def _mix(section: DataSection, check: DataCheck, samples: list[Sample]) -> None:
    """The ``task_ratio`` shares, or why the sampler cannot be built on `samples`."""
    from cmoe.reference_models.unimed.data.mixing import TaskRatioSampler

    if section.sampler != "task_ratio" or not samples:
        return
    options = dict(section.sampler_options)
    options.setdefault("ratios", section.mixing_ratios())
    groups = options.setdefault("groups", section.mixing_groups() or {})
    try:
        sampler = TaskRatioSampler(samples, 1, 0, **options)
    except CMoEError as error:
        check.mix_problem = f"{error}; fix the ratios or mix_source of data.datasets"
        return
    check.mix = dict(sampler.probabilities)
    sizes = Counter(sample.source for sample in samples)
    for source in sampler.sources:
        members = {name: count for name, count in sizes.items() if groups.get(name, name) == source}
        if len(members) > 1:
            total = sum(members.values())
            check.mix_members[source] = {name: count / total for name, count in members.items()}


def _unset_counts(values: Iterable[str]) -> dict[str, int]:
    """The unset environment variables written in `values` (`cmoe.errors.unset_variables`), with how many of the
    values use each."""
    found: Counter[str] = Counter()
    for value in values:
        found.update(unset_variables(value))
    return dict(found)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def model_paths(model: ModelSection) -> list[tuple[str, str]]:
    """``(what, path)`` for every local file or folder the model section loads: encoder and LLM weights and the
    tokenizer (what ``UNIMED_MODELS`` points at in the paper config)."""
    paths = [(f"vision encoder {model.vision_encoder.name}", model.vision_encoder.options.get("path")),
             (f"LLM {model.llm.name}", model.llm.options.get("path")),
             ("tokenizer", model.tokenizer.path if model.tokenizer.kind == "pretrained" else None)]
    return [(what, str(path)) for what, path in paths if isinstance(path, (str, os.PathLike))]


def format_environment(data: DataSection, model: ModelSection | None = None) -> list[str]:
    """Lines for the variables a config uses that are not set (each named once, with the export that fixes it)
    and, given `model`, whether each model path is there."""
    data_values = [value for entry in data.datasets for value in _strings([entry.root, entry.options])]
    model_rows = model_paths(model) if model is not None else []
    lines = []
    for name, count in sorted(_unset_counts(data_values + [path for _, path in model_rows]).items()):
        kind = "datasets" if name in " ".join(data_values) else "models"
        lines.append(f"{name} is not set: {count} path(s) of this config read ${{{name}}}; export "
                     f"{name}=/path/to/{kind} (local files: nothing is downloaded)")
    if model_rows:
        lines.append("models (training and evaluation load them; reading the data does not):")
        for what, path in model_rows:
            state = "found" if Path(path).expanduser().exists() else "missing"
            lines.append(f"  {what}: {path} ({state})")
    return lines


def check_data(section: DataSection) -> DataCheck:
    """Read every dataset of `section` in its training and evaluation splits (as training and evaluation would)
    and report each one's layout, entries and problems, and the mix of the training split."""
    train, evaluation = section.train_split, section.eval_split
    splits = list(dict.fromkeys((train, evaluation)))
    if section.synthetic is not None:
        from cmoe.reference_models.unimed.data.splits import load_split

        dataset = DatasetCheck("synthetic", "(built in, nothing read from disk)", None,
                               {split: SplitCheck(len(load_split(section, split))) for split in splits})
        return DataCheck(train, evaluation, [dataset], synthetic=True)
    datasets, train_samples = [], []
    for entry in section.datasets:
        dataset = DatasetCheck(entry.name, entry.root, _layout(entry.name, entry.root, train, entry.options))
        for split in splits:
            dataset.splits[split], samples = _check_split(entry.name, entry.root, split, entry.options)
            if split != train:
                continue
            if dataset.splits[split].other_layout is not None:
                dataset.layout = None  # detection fell back to the release's: the folder is in neither layout
            for sample in samples:
                sample.source = sample.source or entry.name
            train_samples += samples
        datasets.append(dataset)
    check = DataCheck(train, evaluation, datasets)
    if not check.train_problems():
        _mix(section, check, train_samples)
    return check


def _layout_text(name: str, layout: Layout | None) -> str:
    if layout is None:
        return "none found"
    if layout.original:
        return f"{layout.name} (the original's)"
    original = next(choice.name for choice in LAYOUT_CHOICES[name] if choice.original)
    return f"{layout.name} (ours; the original reads {original})"


def format_check(check: DataCheck, title: str = "data") -> str:
    """The check as text: one line per dataset (layout, entries per split), the problems with the file that
    would fix each, the mix, and whether the config can train."""
    splits = list(dict.fromkeys((check.train_split, check.eval_split)))
    rows = [("dataset", "layout", *splits, "root")]
    for d in check.datasets:
        counts = [str(s.count) if s.count is not None else "missing" if s.missing else "error"
                  for s in (d.splits[split] for split in splits)]
        rows.append((d.name, "built-in" if check.synthetic else _layout_text(d.name, d.layout), *counts, d.root))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"{title}: training split {check.train_split!r}, evaluation split {check.eval_split!r}"]
    lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
              for row in rows]
    problems: dict[tuple[str, str], list[str]] = {}
    for d in check.datasets:
        for split, s in d.splits.items():
            if not s.problem:
                continue
            expected = (f"the {d.layout.name} layout: {d.layout.description}"
                        if d.layout and s.other_layout is None else LAYOUTS[d.name])
            text = f"{s.summary}; expected {expected}" if s.missing is not None else s.problem
            problems.setdefault(text, {}).setdefault(d.name, []).append(split)
    if problems:
        lines.append("to add or fix (a missing file or folder is the one that fixes it; each once, with the "
                     "datasets and splits it stops):")
        for text, where in problems.items():
            names = ", ".join(f"{name} [{', '.join(splits)}]" for name, splits in where.items())
            role = ("" if any(check.train_split in splits for splits in where.values())
                    else " (evaluation only: training is not affected)")
            lines.append(f"  {names}{role}: {text}")
    if check.mix:
        lines.append("mix (task_ratio: each batch from one source, drawn with these probabilities):")
        for source, share in sorted(check.mix.items(), key=lambda item: -item[1]):
            members = check.mix_members.get(source)
            inside = (": " + ", ".join(f"{name} {part:.1%}" for name, part in members.items())
                      + " of its entries, by size") if members else ""
            lines.append(f"  {source} {share:.1%}{inside}")
    if check.mix_problem:
        lines.append(f"mix: {check.mix_problem}")
    train_total = sum(d.splits[check.train_split].count or 0 for d in check.datasets)
    lines.append(f"can train: {len(check.datasets)} dataset(s), {train_total} training entries" if check.can_train
                 else f"cannot train: {len(check.train_problems())} problem(s) above")
    return "\n".join(lines)


def format_layouts(section: DataSection, split: str) -> str | None:
    """``layouts: <dataset> <layout>, ...`` for a config's real datasets (None for the synthetic set)."""
    if section.synthetic is not None or not section.datasets:
        return None
    found = [(entry.name, _layout(entry.name, entry.root, split, entry.options)) for entry in section.datasets]
    return "layouts: " + ", ".join(f"{name} {layout.name if layout else '?'}" for name, layout in found)
