"""Uni-Med metrics: hand-computed BLEU, F1, ROUGE, METEOR, IoU and accuracy values, dispatch and input errors."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed import Box
from cmoe.reference_models.unimed.evaluation import metrics as m

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)


def values(results: dict[str, m.Metric]) -> dict[str, float | None]:
    return {name: metric.value for name, metric in results.items()}


def test_normalize_text_lowercases_drops_punctuation_keeps_decimals() -> None:
    assert m.normalize_text("  The Left-Lung's,\n 2.5 cm! ") == "the left lungs 2.5 cm"
    assert m.tokenize("Yes.") == ["yes"]
    assert m.tokenize("?!") == []


def test_identical_answers_score_one() -> None:
    answer = "a small nodule in the left lung"
    assert values(m.sentence_bleu_scores([answer], [answer.upper() + "."])) == {
        "bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0}
    assert m.mean_unigram_f1([answer], [answer]).value == 1.0
    assert m.corpus_bleu4([answer], [answer]).value == pytest.approx(1.0)


def test_one_word_bleu_uses_smoothing_method1_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = values(m.sentence_bleu_scores(["Yes"], ["yes"]))
        assert m.sentence_bleu_scores(["no"], ["yes"])["bleu1"].value == 0.0
    assert scores["bleu1"] == 1.0
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.1))
    assert scores["bleu3"] == pytest.approx(0.1 ** (2 / 3))
    assert scores["bleu4"] == pytest.approx(0.1 ** (3 / 4))


def test_unigram_f1_partial_overlap() -> None:
    assert m.unigram_f1("left lung", "the left lung") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert m.unigram_f1("lung lung", "lung") == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert m.unigram_f1("heart", "liver") == 0.0
    assert m.unigram_f1("", "liver") == 0.0
    assert m.mean_unigram_f1(["left lung", "heart"], ["the left lung", "liver"]).value == pytest.approx(0.4)


def test_closed_accuracy_is_reference_contained_in_prediction() -> None:
    assert m.closed_accuracy(["Yes, it is.", "no", "not sure"], ["yes", "yes", "No"]).value == pytest.approx(2 / 3)


def test_vqa_splits_by_answer_type() -> None:
    preds, refs = ["yes", "the left lung", "no"], ["yes", "left lung", "yes"]
    meta = [{"answer_type": "closed"}, {"answer_type": "open"}, {"answer_type": "CLOSED"}]
    results = m.evaluate_task("vqa", preds, refs, meta)
    assert results["closed/accuracy"].value == 0.5 and results["closed/accuracy"].count == 2
    assert results["closed/bleu1"].value == 0.5
    assert results["open/f1"].value == pytest.approx(0.8)
    assert results["all/f1"].value == pytest.approx(1.8 / 3)
    assert results["all/bleu4"].count == 3
    assert {k.split("/")[1] for k in results} == {"bleu1", "bleu2", "bleu3", "bleu4", "f1", "accuracy"}


def test_vqa_without_answer_types_has_only_all() -> None:
    results = m.evaluate_task("vqa", ["yes"], ["yes"])
    assert results["all/f1"].value == 1.0
    assert results["open/f1"].value is None and str(results["closed/accuracy"]) == "n/a (no samples)"
    with pytest.raises(CMoEError, match="answer_types\\[0\\].*'yes/no'"):
        m.evaluate_task("vqa", ["yes"], ["yes"], [{"answer_type": "yes/no"}])


def test_report_rouge_on_a_known_pair() -> None:
    results = m.evaluate_task("report", ["The heart is normal."], ["the heart size is normal"], coco=False)
    assert set(results) == {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "coco_rougeL", "cider", "rouge1",
                            "rouge2", "rougeL", "f1"}
    assert results["meteor"].note == m.COCO_OFF  # the Java COCO metrics: tests/unimed/evaluation/test_unimed_coco_caption.py
    assert results["rougeL"].value == pytest.approx(8 / 9)  # LCS 4: P = 4/4, R = 4/5
    assert results["rouge1"].value == pytest.approx(8 / 9)
    assert results["rouge2"].value == pytest.approx(4 / 7)  # 2 shared bigrams: P = 2/3, R = 2/4
    assert results["f1"].value == pytest.approx(8 / 9)
    assert 0.0 < m.corpus_bleu4(["The heart is normal."], ["the heart size is normal"]).value < 1.0


def test_meteor_is_unavailable_without_wordnet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "wordnet_available", lambda: False)
    metric = m.meteor(["the heart is normal"], ["the heart is normal"])
    assert metric.value is None and not metric.available
    assert metric.note == m.METEOR_NEEDS_WORDNET
    assert str(metric).startswith("n/a (needs NLTK's WordNet data: run python -m nltk.downloader wordnet")


def test_meteor_with_wordnet(monkeypatch: pytest.MonkeyPatch) -> None:
    if not m.wordnet_available():
        monkeypatch.setattr(m, "wordnet_available", lambda: True)
        monkeypatch.setattr(m, "_wordnet", lambda: SimpleNamespace(synsets=lambda word: []))
        # One chunk of 4 exact matches: fmean 1, fragmentation penalty 0.5 · (1/4)^3.
        assert m.meteor(["the heart is normal"], ["The heart is normal."]).value == pytest.approx(1 - 0.5 / 64)
    metric = m.meteor(["the heart is normal", "no effusion"], ["the heart size is normal", "pleural effusion"])
    assert metric.count == 2 and 0.0 <= metric.value <= 1.0


def test_rec_iou_threshold_is_strictly_above_half() -> None:
    truth = Box(0, 0, 10, 10)
    preds = ["{<0><0><10><5>}", "{<0><0><10><6>}", "I cannot find it"]  # IoU 0.5, 0.6, unparseable
    expected = {"miou": pytest.approx(1.1 / 3), "acc@0.5": pytest.approx(1 / 3),
                "parse_failure_rate": pytest.approx(1 / 3)}
    assert values(m.evaluate_task("rec", preds, [truth] * 3)) == expected
    assert values(m.evaluate_task("rec", preds, ["{<0><0><10><10>}"] * 3)) == expected
    assert values(m.evaluate_task("rec", preds, [None] * 3, [{"box": truth}] * 3)) == expected


def test_rec_rejects_an_unreadable_reference() -> None:
    with pytest.raises(CMoEError, match="references\\[1\\]"):
        m.rec_metrics(["{<0><0><1><1>}"] * 2, [Box(0, 0, 1, 1), "somewhere"])


def test_reg_and_cls_exact_match() -> None:
    results = values(m.evaluate_task("reg", ["Left Lung.", "heart"], ["left lung", "liver"]))
    assert results == {"bleu1": 0.5, "bleu2": 0.5, "bleu3": pytest.approx(0.5 * 0.1 ** (1 / 3)),
                       "bleu4": pytest.approx(0.5 * 0.1 ** (2 / 4)), "f1": 0.5, "accuracy": 0.5}
    assert values(m.evaluate_task("cls", ["Melanoma", "nevus", "liver"], ["melanoma", "Nevus.", "kidney"])) == {
        "accuracy": pytest.approx(2 / 3)}


def test_qa_yes_no_maybe_takes_the_first_such_word() -> None:
    preds = ["No, it is not.", "Maybe yes", "Yes, but no", "it is unclear", "Aspirin."]
    refs = ["no", "maybe", "no", "yes", "aspirin"]
    assert values(m.qa_accuracy(preds, refs)) == {
        "yes_no_maybe/accuracy": pytest.approx(2 / 4), "free_text/accuracy": 1.0, "all/accuracy": pytest.approx(3 / 5)}
    assert m.evaluate_task("qa", ["aspirin and rest"], ["aspirin"])["all/accuracy"].value == 0.0


def test_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(CMoEError, match="2 predictions, 1 references"):
        m.evaluate_task("cls", ["a", "b"], ["a"])
    with pytest.raises(CMoEError, match="1 meta entries, 2 predictions"):
        m.evaluate_task("vqa", ["a", "b"], ["a", "b"], [{}])
    with pytest.raises(CMoEError, match="predictions\\[0\\]: expected a string"):
        m.evaluate_task("cls", [None], ["a"])


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="known tasks: cls, qa, rec, reg, report, vqa"):
        m.evaluate_task("caption", [], [])


@pytest.mark.parametrize("task", sorted(m.EVALUATORS))
def test_empty_inputs_give_unavailable_metrics(task: str) -> None:
    results = m.evaluate_task(task, [], [])
    assert results and all(metric.value is None and metric.note for metric in results.values())


def test_metric_formats_for_tables() -> None:
    assert str(m.Metric(0.123456, 3)) == "0.1235"
    assert str(m.Metric.unavailable("no samples")) == "n/a (no samples)"
