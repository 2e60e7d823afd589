"""IMAX tools: merging task datasets by image (id or hash), the paper's statistics with known answers, DMAX
derivation and whole-image subsampling."""

from __future__ import annotations

import numpy as np
import pytest

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.data.imax import (
    MergedImages,
    annotation_stats,
    format_stats,
    merge_by_image,
    subsample_images,
    to_dmax,
)
from cmoe.reference_models.unimed.data.mixing import ImageCentricSampler
from cmoe.reference_models.unimed.data.sample import Sample

FIELDS = {"vqa": {"question": "q"}, "rec": {"object": "liver"}, "report": {"question": "Describe."}}

# image -> {task: entries}; known answers below are counted by hand from this table.
LAYOUT = {
    "A": {"vqa": 2, "rec": 1, "report": 1},
    "B": {"vqa": 1, "rec": 2},
    "C": {"vqa": 1},
    "D": {"report": 1},
    "E": {"rec": 1, "report": 1},
    "F": {"vqa": 3},
}
SOURCE = {"vqa": "slake_vqa", "rec": "slake_rec", "report": "mimic_cxr"}


def pixels(name: str) -> np.ndarray:
    return np.full((3, 3), ord(name), dtype=np.uint8)


def fixture() -> dict[str, list[Sample]]:
    datasets: dict[str, list[Sample]] = {name: [] for name in SOURCE.values()}
    for image, tasks in LAYOUT.items():
        for task, count in tasks.items():
            datasets[SOURCE[task]] += [Sample(task, FIELDS[task], f"{image}{k}", image=pixels(image),
                                              image_id=image, source=SOURCE[task]) for k in range(count)]
    datasets["medqa"] = [Sample("qa", {"question": "q"}, "a") for _ in range(2)]  # source from the dict key
    return datasets


def test_merge_gives_each_image_every_task_it_has() -> None:
    merged = merge_by_image(fixture())
    assert list(merged.images) == ["A", "B", "C", "F", "E", "D"]  # first appearance, dataset by dataset
    assert {key: group.tasks for key, group in merged.images.items()} == {
        key: tuple(sorted(tasks)) for key, tasks in LAYOUT.items()}
    assert {key: len(group) for key, group in merged.images.items()} == {
        key: sum(tasks.values()) for key, tasks in LAYOUT.items()}
    assert merged["A"].sources == ("mimic_cxr", "slake_rec", "slake_vqa")
    assert len(merged.text_only) == 2 and merged.num_entries == 16
    assert {e.source for e in merged.text_only} == {"medqa"}


def test_annotation_stats_known_answers() -> None:
    stats = annotation_stats(fixture())
    assert stats["images"] == 6
    assert stats["entries"] == 16 and stats["image_entries"] == 14 and stats["text_only_entries"] == 2
    assert stats["tasks"] == ["qa", "rec", "report", "vqa"]
    assert stats["tasks_per_image"]["mean"] == pytest.approx(10 / 6)
    assert stats["tasks_per_image"]["histogram"] == {1: 3, 2: 2, 3: 1}
    assert stats["tasks_per_image"]["max"] == 3
    assert stats["entries_per_image"]["mean"] == pytest.approx(14 / 6)
    assert stats["entries_per_image"]["histogram"] == {1: 2, 2: 1, 3: 2, 4: 1}
    assert stats["entries_per_image"]["median"] == 2.5
    assert stats["entries_per_task"] == {"qa": 2, "rec": 4, "report": 3, "vqa": 7}
    assert stats["entries_per_source"] == {"medqa": 2, "mimic_cxr": 3, "slake_rec": 4, "slake_vqa": 7}
    assert stats["images_per_task"] == {"rec": 3, "report": 3, "vqa": 4}
    assert stats["task_cooccurrence"]["rec"] == {"rec": 3, "report": 2, "vqa": 2}
    flat = [s for entries in fixture().values() for s in entries]
    flat_stats = annotation_stats(flat)
    assert flat_stats.pop("entries_per_source") == {"": 2, "mimic_cxr": 3, "slake_rec": 4, "slake_vqa": 7}
    assert flat_stats == {k: v for k, v in stats.items() if k != "entries_per_source"}
    assert annotation_stats(merge_by_image(fixture())) == stats


def test_format_stats_is_a_markdown_table() -> None:
    text = format_stats(annotation_stats(fixture()), title="fixture")
    assert text.startswith("### fixture\n")
    assert "| images | 6 |" in text
    assert "| tasks per image (mean / median / max) | 1.67 / 1.5 / 3 |" in text
    assert "| vqa | 7 | 4 |" in text and "| qa | 2 | 0 |" in text
    assert "| 4 | 1 | 16.7% |" in text


def test_hash_identity_merges_the_same_image_under_different_ids(tmp_path) -> None:
    first = Sample("vqa", FIELDS["vqa"], "yes", image=pixels("X"), image_id="slake/17", source="slake_vqa")
    second = Sample("rec", FIELDS["rec"], "{<1><2><3><4>}", image=pixels("X").copy(), image_id="sam/abc",
                    source="samed2d_rec")
    other = Sample("rec", FIELDS["rec"], "{<1><2><3><4>}", image=pixels("Y"), image_id="sam/abc2")
    assert len(merge_by_image([first, second, other])) == 3
    merged = merge_by_image({"slake_vqa": [first], "samed2d_rec": [second, other]}, identity="hash")
    assert len(merged) == 2
    group = next(iter(merged))
    assert group.tasks == ("rec", "vqa") and len(group) == 2
    relabelled = merged.samples()
    assert relabelled[0].image_id == relabelled[1].image_id == group.key != relabelled[2].image_id
    assert first.image_id == "slake/17"
    sampler = ImageCentricSampler(relabelled, batch_size=2, seed=0)
    assert sorted(map(len, sampler.groups)) == [1, 2]

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    files = [Sample("vqa", FIELDS["vqa"], "x", image=str(a), image_id="1"),
             Sample("vqa", FIELDS["vqa"], "y", image=b, image_id="2")]
    assert len(merge_by_image(files, identity="hash")) == 1
    assert len(merge_by_image(files, identity=lambda s: s.answer)) == 2
    with pytest.raises(UnknownNameError, match="unknown identity 'path'"):
        merge_by_image(files, identity="path")


@pytest.mark.parametrize("tasks_per_image", [1, 2])
def test_to_dmax_keeps_each_image_for_at_most_n_tasks(tasks_per_image: int) -> None:
    data = fixture()
    dmax = to_dmax(data, tasks_per_image=tasks_per_image, seed=3)
    merged = merge_by_image(dmax)
    for key, group in merged.images.items():
        assert len(group.tasks) == min(tasks_per_image, len(LAYOUT[key]))
        assert set(group.tasks) <= set(LAYOUT[key])
        for task in group.tasks:
            assert sum(e.task == task for e in group.entries) == LAYOUT[key][task]
    assert len(merged) == 6 and len(merged.text_only) == 2
    stats = annotation_stats(dmax)
    assert stats["tasks_per_image"]["max"] == tasks_per_image
    assert to_dmax(data, tasks_per_image, seed=3) == dmax
    with pytest.raises(CMoEError, match="tasks_per_image"):
        to_dmax(data, tasks_per_image=0)


def test_subsample_images_keeps_whole_images_within_budget() -> None:
    data = fixture()
    for seed in range(5):
        cut = subsample_images(data, max_entries=6, seed=seed)
        merged = merge_by_image(cut)
        assert sum(len(g) for g in merged) <= 6 and len(merged.text_only) == 2
        for key, group in merged.images.items():
            assert len(group) == sum(LAYOUT[key].values())
    assert len(subsample_images(data, max_entries=14)) == 16
    assert isinstance(merge_by_image([]), MergedImages)
