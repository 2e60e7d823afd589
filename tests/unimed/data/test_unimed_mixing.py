"""Uni-Med multi-task samplers: one source per batch at the paper's ratios, image-centric packing, plain mixing,
determinism and exact resumption by skipping."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.data.mixing import (
    UNIMED_RATIOS,
    ImageCentricSampler,
    MixedTaskSampler,
    TaskRatioSampler,
    build_sampler,
)
from cmoe.reference_models.unimed.data.sample import Sample

PIXEL = np.zeros((2, 2), dtype=np.uint8)


def entry(source: str, image_id: str | None = None, task: str = "vqa") -> Sample:
    if image_id is None and task != "qa":
        task = "qa"
    image = None if task == "qa" else PIXEL
    return Sample(task, {"question": "q"}, "a", image=image, image_id=image_id, source=source)


def sourced(sizes: dict[str, int]) -> list[Sample]:
    return [entry(name, f"{name}-{i}") for name, size in sizes.items() for i in range(size)]


def grouped(group_sizes: list[int], text_only: int = 0) -> list[Sample]:
    """Entries of images ``img0, img1, ...`` with the given numbers of entries, interleaved (so groups are
    not contiguous in the input), plus text-only QA entries."""
    pending = [[f"img{g}"] * size for g, size in enumerate(group_sizes)]
    samples = []
    while any(pending):
        for ids in pending:
            if ids:
                samples.append(entry("mix", ids.pop()))
    return samples + [entry("medqa") for _ in range(text_only)]


def test_unimed_ratios_are_the_originals_with_medmnist_split() -> None:
    assert UNIMED_RATIOS == {"medqa": 2, "pubmedqa": 2, "slake_vqa": 5, "pathvqa": 5, "slake_rec": 4,
                             "slake_reg": 4, "samed2d_rec": 4, "samed2d_reg": 4, "medpix": 8, "mimic_cxr": 8,
                             "dermamnist": 2, "organsmnist": 2}
    assert sum(UNIMED_RATIOS.values()) == 50
    samples = sourced({name: 3 for name in UNIMED_RATIOS})
    sampler = TaskRatioSampler(samples, batch_size=4, seed=42)
    assert sampler.probabilities["medpix"] == pytest.approx(8 / 50)


def test_task_ratio_batches_hold_one_source_at_the_ratios() -> None:
    samples = sourced({"a": 3, "b": 10, "c": 7})
    ratios = {"a": 1, "b": 2, "c": 5}
    sampler = TaskRatioSampler(samples, batch_size=4, seed=0, ratios=ratios)
    batches = sampler.take(8000)
    sources = []
    for batch in batches:
        assert len(batch) == 4
        names = {samples[i].source for i in batch}
        assert len(names) == 1
        sources.append(names.pop())
    assert sources == sampler.source_sequence(8000)
    counts = Counter(sources)
    for name, ratio in ratios.items():
        assert counts[name] / len(batches) == pytest.approx(ratio / 8, abs=0.02)


def test_task_ratio_walks_each_source_cycle_without_repeats() -> None:
    samples = sourced({"a": 5, "b": 8})
    sampler = TaskRatioSampler(samples, batch_size=3, seed=1, ratios={"a": 1, "b": 1})
    streams: dict[str, list[int]] = {"a": [], "b": []}
    for batch in sampler.take(200):
        streams[samples[batch[0]].source].extend(batch)
    for name, stream in streams.items():
        n = sum(s.source == name for s in samples)
        passes = [stream[k * n:(k + 1) * n] for k in range(len(stream) // n)]
        assert len(passes) >= 3
        for one_pass in passes:
            assert sorted(one_pass) == sorted(i for i, s in enumerate(samples) if s.source == name)
        assert passes[0] != passes[1] or passes[1] != passes[2]


def test_task_ratio_is_deterministic_and_resumes_exactly() -> None:
    samples = sourced({"a": 3, "b": 10, "c": 7})
    make = lambda seed: TaskRatioSampler(samples, 4, seed, ratios={"a": 1, "b": 2, "c": 5})  # noqa: E731
    full = make(7).take(2600)
    assert full == list(islice(iter(make(7)), 2600))
    assert make(8).take(50) != full[:50]
    for start in (1, 40, 1023, 1024, 2049):
        assert make(7).take(2600 - start, start=start) == full[start:]


def test_task_ratio_errors_name_the_bad_sources() -> None:
    samples = sourced({"a": 2, "b": 2})
    with pytest.raises(CMoEError, match="no ratio for sources present in the data: 'b'"):
        TaskRatioSampler(samples, 2, ratios={"a": 1})
    with pytest.raises(CMoEError, match="ratios given for sources with no entries: 'zzz'"):
        TaskRatioSampler(samples, 2, ratios={"a": 1, "b": 1, "zzz": 3})
    with pytest.raises(CMoEError, match="'b'=0"):
        TaskRatioSampler(samples, 2, ratios={"a": 1, "b": 0})
    with pytest.raises(CMoEError, match="'a'=-1"):
        TaskRatioSampler(samples, 2, ratios={"a": -1, "b": 1})
    sampler = TaskRatioSampler(samples, 2, ratios={"a": 1, "b": 3, "zzz": 3}, ignore_absent=True)
    assert sampler.probabilities == {"a": 0.25, "b": 0.75}


def test_mixed_covers_every_entry_once_per_epoch() -> None:
    samples = sourced({"a": 6, "b": 5})
    sampler = MixedTaskSampler(samples, batch_size=4, seed=3)
    assert sampler.batches_per_epoch == 3
    epochs = [sampler.epoch_batches(e) for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 3]
        assert sorted(i for b in batches for i in b) == list(range(11))
    assert epochs[0] != epochs[1]
    assert sampler.take(9) == [b for batches in epochs for b in batches]
    assert sampler.take(4, start=5) == sampler.take(9)[5:]
    assert [len(b) for b in MixedTaskSampler(samples, 4, 3, drop_last=True).epoch_batches(0)] == [4, 4]


def batch_of_each_entry(batches: list[list[int]]) -> dict[int, int]:
    return {i: position for position, batch in enumerate(batches) for i in batch}


@pytest.mark.parametrize("seed", range(4))
def test_image_centric_keeps_images_together_and_covers_each_entry_once(seed: int) -> None:
    samples = grouped([1, 2, 3, 4, 7, 2, 5, 1, 3, 9], text_only=4)
    sampler = ImageCentricSampler(samples, batch_size=4, seed=seed)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(samples)))
        assert [len(b) for b in batches[:-1]] == [4] * (len(batches) - 1)
        where = batch_of_each_entry(batches)
        for group in sampler.groups:
            spans = sorted({where[i] for i in group})
            assert spans == list(range(spans[0], spans[-1] + 1))
            assert len(spans) <= -(-len(group) // 4) + 1


def test_image_centric_never_splits_groups_that_pack_exactly() -> None:
    samples = grouped([2] * 8 + [1] * 4)
    sampler = ImageCentricSampler(samples, batch_size=4, seed=5)
    for epoch in range(4):
        where = batch_of_each_entry(sampler.epoch_batches(epoch))
        for group in sampler.groups:
            assert len({where[i] for i in group}) == 1
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_image_centric_is_deterministic_and_resumes_across_epochs() -> None:
    samples = grouped([3, 1, 2, 5, 2], text_only=2)
    make = lambda: ImageCentricSampler(samples, batch_size=4, seed=11)  # noqa: E731
    assert make().batches_per_epoch == 4
    full = make().take(13)
    assert full == [b for e in range(4) for b in make().epoch_batches(e)][:13]
    for start in (1, 4, 6, 9):
        assert make().take(13 - start, start=start) == full[start:]
    assert ImageCentricSampler(samples, 4, seed=12).take(13) != full


def test_build_sampler_by_name_and_unknown_kind() -> None:
    samples = sourced({"a": 4, "b": 4})
    assert isinstance(build_sampler("task_ratio", samples, 2, 0, ratios={"a": 1, "b": 1}), TaskRatioSampler)
    assert isinstance(build_sampler("mixed", samples, 2, 0), MixedTaskSampler)
    sampler = build_sampler("image_centric", samples, 2, 0, lookahead=2)
    assert isinstance(sampler, ImageCentricSampler) and sampler.lookahead == 2
    with pytest.raises(UnknownNameError, match="unknown sampler 'shuffled'; known samplers: image_centric, "
                                               "mixed, task_ratio"):
        build_sampler("shuffled", samples, 2, 0)


def test_bad_arguments_are_reported() -> None:
    samples = sourced({"a": 4})
    with pytest.raises(CMoEError, match="batch_size"):
        MixedTaskSampler(samples, 0)
    with pytest.raises(CMoEError, match="samples"):
        MixedTaskSampler([], 2)
    with pytest.raises(CMoEError, match="seed"):
        MixedTaskSampler(samples, 2, seed=-1)
    with pytest.raises(CMoEError, match="start"):
        MixedTaskSampler(samples, 2).take(1, start=-3)
    with pytest.raises(CMoEError, match="drop_last"):
        ImageCentricSampler(samples, 8, drop_last=True)
