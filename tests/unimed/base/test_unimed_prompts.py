"""Uni-Med prompts and box text: the template, task identifiers, answer clean-up, box encode/parse round trips."""

from __future__ import annotations

import pytest

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed import (
    IMAGE_PLACEHOLDER,
    TASKS,
    Box,
    box_iou,
    build_prompt,
    clean_answer,
    encode_box,
    get_task,
    parse_box,
    split_at_image,
)


def test_six_tasks_with_the_papers_identifiers() -> None:
    assert {t.identifier for t in TASKS.values()} == {"[qa]", "[vqa]", "[caption]", "[refer]", "[identify]", "[cls]"}
    assert [name for name, t in TASKS.items() if not t.has_image] == ["qa"]


def test_vqa_prompt_matches_the_original_template() -> None:
    parts = build_prompt(get_task("vqa"), {"question": "Is the lung healthy?"}, answer="yes")
    assert parts.prompt == ("[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question "
                            "with a short answer: Is the lung healthy? [/INST]")
    assert parts.answer == "yes</s>"
    before, after = split_at_image(parts.prompt)
    assert before == "[INST] <Img>" and after.startswith("</Img> [vqa]")


def test_qa_prompt_has_no_image_and_generation_has_no_answer() -> None:
    parts = build_prompt(get_task("qa"), {"question": "What causes gout?"})
    assert IMAGE_PLACEHOLDER not in parts.prompt and split_at_image(parts.prompt) is None
    assert parts.prompt.startswith("[INST] [qa] If you are a doctor") and parts.answer == ""


def test_missing_instruction_field_and_unknown_task_say_what_is_needed() -> None:
    with pytest.raises(KeyError, match="needs field 'object'"):
        build_prompt(get_task("rec"), {"question": "x"})
    with pytest.raises(UnknownNameError, match="unknown task 'ocr'; known tasks: cls, qa, rec, reg, report, vqa"):
        get_task("ocr")
    with pytest.raises(ValueError, match="at most one <ImageHere>, got 2"):
        split_at_image("<ImageHere> and <ImageHere>")


def test_clean_answer_collapses_whitespace_and_cuts_to_50_words() -> None:
    assert clean_answer("  The   heart\n is \t enlarged.</s>") == "The heart is enlarged."
    assert clean_answer(" ".join(map(str, range(80)))).split() == [str(i) for i in range(50)]
    assert clean_answer("  </s> ") == ""


def test_encode_box_uses_0_to_100_corners() -> None:
    assert encode_box((50, 20, 100, 60), width=200, height=100) == "{<25><20><75><80>}"
    assert encode_box((0, 0, 300, 300), width=256, height=256) == "{<0><0><100><100>}"  # clamped
    with pytest.raises(CMoEError, match="image size: expected positive width and height"):
        encode_box((0, 0, 1, 1), width=0, height=10)


@pytest.mark.parametrize("xywh,size", [((50, 20, 100, 60), (200, 100)), ((3, 7, 11, 5), (224, 224)),
                                       ((0, 0, 224, 224), (224, 224))])
def test_encode_then_parse_round_trips_within_one_unit(xywh, size) -> None:
    box = parse_box(encode_box(xywh, *size))
    x, y, w, h = box.to_pixels(*size)
    unit_x, unit_y = size[0] / 100, size[1] / 100
    assert abs(x - xywh[0]) <= unit_x and abs(y - xywh[1]) <= unit_y
    assert abs(x + w - (xywh[0] + xywh[2])) <= unit_x and abs(y + h - (xywh[1] + xywh[3])) <= unit_y


@pytest.mark.parametrize("text,expected", [
    ("{<25><20><75><80>}", Box(25, 20, 75, 80)),
    ("The location is { <25> <20> <75> <80> } in the image.", Box(25, 20, 75, 80)),
    ("<75><80><25><20>", Box(25, 20, 75, 80)),  # reversed corners are swapped
    ("{<-5><20><130><80.6>}", Box(0, 20, 100, 81)),  # clamped and rounded
    ("{<25><20><75>}", None),
    ("no box here", None),
])
def test_parse_box_is_tolerant(text: str, expected: Box | None) -> None:
    assert parse_box(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("10,20,30,40", [10.0, 20.0, 30.0, 40.0]),
    (" (1.5, 2 3 ,4) ", [1.5, 2.0, 3.0, 4.0]),
    ("1,2,3", None),
    ("1,2,3,4,5", None),
    ("the liver", None),
    ("{<1><2><3><4>}", None),
])
def test_parse_pixel_box_reads_four_typed_numbers(text: str, expected: list[float] | None) -> None:
    from cmoe.reference_models.unimed.boxes import parse_pixel_box

    assert parse_pixel_box(text) == expected


def test_box_iou_known_values() -> None:
    a = Box(0, 0, 10, 10)
    assert box_iou(a, a) == 1.0
    assert box_iou(a, Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou(a, Box(20, 20, 30, 30)) == 0.0
    assert box_iou(a, None) == 0.0 and box_iou(Box(1, 1, 1, 1), Box(1, 1, 1, 1)) == 0.0


def test_encode_box_does_not_lose_a_unit_to_float_rounding() -> None:
    # 29 / 100 * 100 == 28.999…; the encoder multiplies first, so exact pixel values stay exact.
    assert encode_box((29, 57, 29, 1), 100, 100) == "{<29><57><58><58>}"
