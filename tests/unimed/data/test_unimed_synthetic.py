"""The synthetic multi-task set: determinism, task counts per image, dense vs sparse budget, ground truth read
back from the pixels (boxes, organs, lesions), vocabulary coverage, disjoint splits and config errors."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed import TASKS, build_prompt, parse_box
from cmoe.reference_models.unimed.data import Sample
from cmoe.reference_models.unimed.data.synthetic import (
    LESION_LEVELS,
    MODALITIES,
    ORGAN_LEVELS,
    QA_FACTS,
    SPARSE_GROUPS,
    TEXTURE_AMPLITUDE,
    VOCABULARY,
    SyntheticConfig,
    generate,
    generate_splits,
    split_words,
    vocabulary,
)

SMALL = SyntheticConfig(num_images=40, qa_questions=10, seed=3)


@pytest.fixture(scope="module")
def dense() -> list[Sample]:
    return generate(SMALL)


@pytest.fixture(scope="module")
def sparse() -> list[Sample]:
    return generate(SyntheticConfig(num_images=40, qa_questions=10, seed=3, annotation="sparse"))


def by_image(samples: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.image_id is not None:
            groups[sample.image_id].append(sample)
    return groups


def box_slice(sample: Sample) -> tuple[slice, slice]:
    """Rows and columns of the pixels the sample's box covers (pixel boxes from the 0–100 text)."""
    size = sample.image.shape[0]
    x, y, w, h = parse_box(sample.answer if sample.task == "rec" else sample.fields["box"]).to_pixels(size, size)
    return slice(math.floor(y), math.ceil(y + h)), slice(math.floor(x), math.ceil(x + w))


def organ_pixels(image: np.ndarray, organ: str) -> np.ndarray:
    return np.abs(image.astype(int) - ORGAN_LEVELS[organ]) <= TEXTURE_AMPLITUDE


def lesion_pixels(image: np.ndarray) -> np.ndarray:
    return (image == LESION_LEVELS["bright"]) | (image == LESION_LEVELS["dark"])


def test_same_seed_gives_identical_samples_and_another_seed_differs(dense: list[Sample]) -> None:
    again = generate(SMALL)
    assert len(again) == len(dense)
    for a, b in zip(dense, again):
        assert (a.task, a.fields, a.answer, a.image_id, a.source, a.meta) == (b.task, b.fields, b.answer,
                                                                              b.image_id, b.source, b.meta)
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)
    other = generate(SyntheticConfig(num_images=40, qa_questions=10, seed=4))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(dense, other) if a.image is not None)


def test_dense_gives_every_image_every_task(dense: list[Sample]) -> None:
    groups = by_image(dense)
    assert len(groups) == 40 and set(groups) == {f"synthetic/{i}" for i in range(40)}
    for entries in groups.values():
        counts = Counter(s.task for s in entries)
        assert counts["cls"] == 1 and counts["report"] == 1 and counts["vqa"] == SMALL.vqa_per_image
        assert counts["rec"] == counts["reg"] and 1 <= counts["rec"] <= 3
        assert [s.meta["answer_type"] for s in entries if s.task == "vqa"] == ["closed", "open"]
        assert all(s.image is entries[0].image for s in entries)
        assert entries[0].image.shape == (32, 32) and entries[0].image.dtype == np.uint8
        assert all(s.source == f"synthetic_{s.task}" for s in entries)
    qa = [s for s in dense if s.task == "qa"]
    assert len(qa) == 10 and all(s.image is None and s.image_id is None and s.source == "synthetic_qa" for s in qa)
    assert all((s.fields["question"], s.answer) in QA_FACTS for s in qa)


def test_sparse_serves_one_group_per_image_with_the_dense_entry_budget(dense: list[Sample],
                                                                       sparse: list[Sample]) -> None:
    groups = by_image(sparse)
    assert all(tuple(sorted({s.task for s in entries})) in {tuple(sorted(g)) for g in SPARSE_GROUPS}
               for entries in groups.values())
    assert Counter(s.task for s in sparse) == Counter(s.task for s in dense)
    assert len(groups) > 3 * len(by_image(dense))
    assert all(image_id.startswith("synthetic/sparse/") for image_id in groups)


def test_task_subset_keeps_the_images_and_only_those_tasks(dense: list[Sample]) -> None:
    only = generate(SyntheticConfig(num_images=40, seed=3, tasks=("rec", "cls")))
    assert {s.task for s in only} == {"rec", "cls"}
    first = {s.image_id: s.image for s in dense}
    assert all(np.array_equal(s.image, first[s.image_id]) for s in only)
    sparse = generate(SyntheticConfig(num_images=10, seed=3, tasks=("reg",), annotation="sparse"))
    assert all({s.task for s in entries} == {"reg"} for entries in by_image(sparse).values())


@pytest.mark.parametrize("size", [32, 48])
def test_boxes_contain_their_organ_and_nothing_but_background_lies_outside_all_boxes(size: int) -> None:
    samples = generate(SyntheticConfig(num_images=30, image_size=size, seed=1, tasks=("rec", "reg")))
    for entries in by_image(samples).values():
        image = entries[0].image
        covered = np.zeros(image.shape, dtype=bool)
        for sample in entries:
            rows, cols = box_slice(sample)
            organ = sample.fields.get("object", sample.answer)
            inside = np.zeros(image.shape, dtype=bool)
            inside[rows, cols] = True
            mask = organ_pixels(image, organ)
            assert mask.any() and not (mask & ~inside).any(), f"{organ} pixels outside its box"
            ys, xs = np.nonzero(mask | (lesion_pixels(image) & inside))
            assert xs.min() <= cols.start + 1 and xs.max() >= cols.stop - 2, "box not tight in x"
            assert ys.min() <= rows.start + 1 and ys.max() >= rows.stop - 2, "box not tight in y"
            covered |= inside
        assert image[~covered].max() <= 40 + TEXTURE_AMPLITUDE


def test_reg_answer_is_the_organ_at_the_box_and_matches_rec(dense: list[Sample]) -> None:
    for entries in by_image(dense).values():
        rec = {s.fields["object"]: s.answer for s in entries if s.task == "rec"}
        for sample in (s for s in entries if s.task == "reg"):
            assert rec[sample.answer] == sample.fields["box"]
            rows, cols = box_slice(sample)
            window = sample.image[rows, cols].astype(int)
            organ_share = organ_pixels(window, sample.answer).mean() + lesion_pixels(window).mean()
            assert organ_share > 0.4
            assert sample.meta["box"] == parse_box(sample.fields["box"])
            assert sample.meta["image_size"] == (32, 32)


def test_vqa_and_report_agree_with_the_lesion_in_the_pixels(dense: list[Sample]) -> None:
    seen = Counter()
    for entries in by_image(dense).values():
        image = entries[0].image
        lesion = lesion_pixels(image)
        boxes = {s.fields["object"]: box_slice(s) for s in entries if s.task == "rec"}
        report = next(s.answer for s in entries if s.task == "report")
        assert report.endswith("no lesion is seen.") != lesion.any()
        for sample in (s for s in entries if s.task == "vqa"):
            kind, answer = sample.meta["question_type"], sample.answer
            seen[kind] += 1
            if sample.meta["answer_type"] == "closed":
                assert answer in ("yes", "no")
            if kind == "abnormal":
                assert (answer == "yes") == lesion.any()
            elif kind == "lesion_in_organ":
                organ = sample.fields["question"].removeprefix("is there a lesion in the ").removesuffix("?")
                in_organ = lesion[boxes[organ]].sum() == lesion.sum() > 0
                assert (answer == "yes") == in_organ
            elif kind == "lesion_where":
                ys, xs = np.nonzero(lesion)
                vertical = "upper" if ys.mean() < image.shape[0] / 2 else "lower"
                horizontal = "left" if xs.mean() < image.shape[1] / 2 else "right"
                assert answer == f"{vertical} {horizontal}"
            elif kind == "lesion_kind":
                assert answer == ("bright" if (image == LESION_LEVELS["bright"]).any() else "dark")
    assert seen["abnormal"] + seen["lesion_in_organ"] > 5 and seen["lesion_where"] > 0


def test_cls_answer_is_the_labelled_modality_and_the_question_lists_every_class(dense: list[Sample]) -> None:
    cls = [s for s in dense if s.task == "cls"]
    assert all(s.answer == MODALITIES[s.meta["label"]] for s in cls)
    assert all(all(name in s.fields["question"] for name in MODALITIES) for s in cls)
    assert len({s.answer for s in cls}) > 1


def test_every_prompt_and_answer_uses_only_vocabulary_words(dense: list[Sample], sparse: list[Sample]) -> None:
    large = generate(SyntheticConfig(num_images=30, image_size=96, seed=5, vqa_per_image=8, qa_questions=48))
    splits = generate_splits(SyntheticConfig(num_images=10, seed=2), eval_images=3)
    known = set(VOCABULARY)
    for sample in [*dense, *sparse, *large, *splits["train"], *splits["test"]]:
        parts = build_prompt(TASKS[sample.task], sample.fields, answer=sample.answer)
        unknown = set(split_words(parts.prompt + " " + parts.answer)) - known
        assert not unknown, f"{sample.task}: {unknown} not in VOCABULARY"
    assert set(vocabulary(large)) <= known and vocabulary() == list(VOCABULARY)
    assert {str(n) for n in range(101)} <= known and len(VOCABULARY) < 400
    assert split_words("{<12><0>} X-ray, yes.") == ["{", "<", "12", ">", "<", "0", ">", "}", "x", "-", "ray", ",",
                                                    "yes", "."]


def test_splits_have_disjoint_images_and_one_dense_test_set_for_both_densities() -> None:
    dense_splits = generate_splits(SyntheticConfig(num_images=20, seed=7), eval_fraction=0.25)
    sparse_splits = generate_splits(SyntheticConfig(num_images=20, seed=7, annotation="sparse"), eval_fraction=0.25)
    for splits in (dense_splits, sparse_splits):
        train_ids = {s.image_id for s in splits["train"]} - {None}
        test_ids = {s.image_id for s in splits["test"]} - {None}
        assert len(test_ids) == 5 and not train_ids & test_ids
        train_images = {s.image.tobytes() for s in splits["train"] if s.image is not None}
        assert not train_images & {s.image.tobytes() for s in splits["test"] if s.image is not None}
    assert len(by_image(dense_splits["train"])) == 15
    assert [(s.task, s.answer, s.image_id) for s in dense_splits["test"]] == \
           [(s.task, s.answer, s.image_id) for s in sparse_splits["test"]]
    assert {s.task for s in dense_splits["test"]} == set(TASKS)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_images": -1}, "num_images"),
    ({"num_images": 0}, "num_images"),
    ({"image_size": 8}, "image_size"),
    ({"seed": -2}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"annotation": "imax"}, "annotation"),
    ({"tasks": ()}, "tasks"),
    ({"tasks": ("vqa", "caption")}, "tasks"),
    ({"tasks": ("rec", "rec")}, "tasks"),
    ({"tasks": "vqa"}, "tasks"),
    ({"vqa_per_image": 0}, "vqa_per_image"),
    ({"max_organs": 4}, "max_organs"),
    ({"lesion_probability": 1.5}, "lesion_probability"),
    ({"qa_questions": 0}, "qa_questions"),
])
def test_bad_config_values_raise_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(CMoEError, match=f"^{message}: expected"):
        SyntheticConfig(**kwargs)


def test_text_only_config_and_bad_split_arguments() -> None:
    qa_only = generate(SyntheticConfig(num_images=0, tasks=("qa",), qa_questions=30))
    assert len(qa_only) == 30 and {s.task for s in qa_only} == {"qa"}
    with pytest.raises(CMoEError, match="^eval_images"):
        generate_splits(SyntheticConfig(num_images=5), eval_images=5)
    with pytest.raises(CMoEError, match="^eval_fraction"):
        generate_splits(SyntheticConfig(num_images=5), eval_fraction=1.0)
    with pytest.raises(CMoEError, match="^config"):
        generate({"num_images": 3})
