"""``--protocol original`` against the original Uni-Med code itself: ``data/unimed_original_golden.json`` holds inputs
and the numbers the original's own scoring functions produced on them (commit 63b9dfb, nltk 3.8.1, rouge 1.0.1,
pycocoevalcap 1.2; the file's ``produced_by`` says how). Ours must give the same values (to 1e-12 relative; they
are equal bit for bit with the locked nltk 3.10.4). Also: the command line writes per-dataset tables that name
the protocol, and the configs choose their protocol."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.evaluation import coco_caption
from cmoe.reference_models.unimed.evaluation import metrics as cmoe_metrics
from cmoe.reference_models.unimed.evaluation import original_protocol as o

GOLDEN = json.loads((Path(__file__).resolve().parents[2] / "data" / "unimed_original_golden.json").read_text())
ROUGE_NAMES = {"rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL",
               "rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}

needs_java = pytest.mark.skipif(coco_caption.unavailable_reason() is not None,
                                reason=str(coco_caption.unavailable_reason()))


def same(ours: float | None, theirs: float) -> bool:
    """Equal to 1e-12 relative (BLEU-n of a missing n-gram order is ~1e-155, so no absolute slack)."""
    return ours is not None and ours == pytest.approx(theirs, rel=1e-12, abs=0)


def mismatches(pairs: list[tuple[object, float | None, float]]) -> list[tuple[object, float | None, float]]:
    return [(where, ours, theirs) for where, ours, theirs in pairs if not same(ours, theirs)]


def test_the_golden_file_says_where_its_numbers_come_from() -> None:
    assert GOLDEN["commit"].startswith("63b9dfb")
    assert GOLDEN["versions"]["nltk"] == "3.8.1" and GOLDEN["versions"]["rouge"] == "1.0.1"
    assert "original" in GOLDEN["produced_by"] and "63b9dfb" in GOLDEN["produced_by"]


@pytest.mark.smoke
def test_normalisation_equals_the_originals() -> None:
    """Articles, number words, punctuation (spaced, removed, or all removed after a digit-comma-digit),
    contractions, symbols kept, at most 32 periods, case, empty text."""
    wrong = [(r["text"], o.normalize_answer(r["text"]), r["normalized"]) for r in GOLDEN["normalize"]
             if o.normalize_answer(r["text"]) != r["normalized"]]
    assert not wrong
    assert len(GOLDEN["normalize"]) > 60


def test_per_pair_bleu_f1_accuracy_and_rouge_equal_the_originals() -> None:
    found = []
    for row in GOLDEN["pairs"]:
        prediction, reference = row["prediction"], row["reference"]
        bleu = o.sentence_bleu_unsmoothed(prediction, reference)
        found += [((prediction, reference, name), bleu[name], value) for name, value in row["bleu"].items()]
        found.append(((prediction, reference, "f1"), o.original_f1(prediction, reference), row["f1"]))
        found.append(((prediction, reference, "in"), o.contains_accuracy(prediction, reference),
                      row["contains_accuracy"]))
        found.append(((prediction, reference, "=="), o.exact_accuracy(prediction, reference), row["exact_accuracy"]))
        if "rouge_of_normalized" in row:
            ours = o.rouge_package_scores(o.normalize_answer(prediction), o.normalize_answer(reference))
            found += [((prediction, reference, name), ours[ROUGE_NAMES[name]], value)
                      for name, value in row["rouge_of_normalized"].items()]
    assert not mismatches(found)
    assert len(found) > 300


RANDOM = json.loads((Path(__file__).resolve().parents[2] / "data" / "unimed_original_random.json").read_text())


def test_random_cases_written_apart_from_the_golden_ones_equal_the_originals() -> None:
    """A second, seeded random set (not made by the code's author): normalisation, F1, unsmoothed BLEU and REC IoU
    equal the original's outputs on every case."""
    assert "63b9dfb" in RANDOM["produced_by"]
    assert [o.normalize_answer(t) for t in RANDOM["texts"]] == RANDOM["normalized"]
    for (prediction, reference), f1, bleu in zip(RANDOM["pairs"], RANDOM["f1"], RANDOM["bleu"], strict=True):
        assert o.original_f1(prediction, reference) == pytest.approx(f1, abs=1e-12)
        ours = o.sentence_bleu_unsmoothed(prediction, reference)
        assert [ours[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12, abs=1e-300)
    ious = [o.rec_iou(answer, xywh, size) for answer, xywh, size in RANDOM["boxes"]]
    assert ious == pytest.approx(RANDOM["iou"], abs=1e-12)
    assert sum(iou > 0 for iou in RANDOM["iou"]) > 200  # most boxes overlap their ground truth


def test_vqa_per_dataset_equals_the_originals() -> None:
    for dataset, data in GOLDEN["vqa"].items():
        rows = data["rows"]
        types = ["closed" if r["answer_type"] in ("CLOSED", "yes/no") else "open" for r in rows]
        ours = o.vqa_scores([r["answer_pred"] for r in rows], [r["answer_gt"] for r in rows], types)
        theirs = data["metrics"]
        found = [((dataset, f"{split}/{name}"), ours[f"{split}/{name}"].value, value)
                 for split in ("open", "closed", "all") for name, value in theirs[split]["bleu_scores"].items()]
        found += [((dataset, f"{split}/f1"), ours[f"{split}/f1"].value, theirs[split]["f1_score"])
                  for split in ("open", "closed", "all")]
        found.append(((dataset, "closed/accuracy"), ours["closed/accuracy"].value, theirs["closed"]["acc_score"]))
        assert not mismatches(found)


def test_reg_and_classification_equal_the_originals() -> None:
    for dataset, data in GOLDEN["reg"].items():
        ours = o.reg_scores([r["answer_pred"] for r in data["rows"]], [r["answer_gt"] for r in data["rows"]])
        theirs = data["metrics"]
        found = [((dataset, name), ours[name].value, value) for name, value in theirs["bleu_scores"].items()]
        found += [((dataset, "f1"), ours["f1"].value, theirs["f1_score"]),
                  ((dataset, "accuracy"), ours["accuracy"].value, theirs["acc_score"])]
        assert not mismatches(found)
    for dataset, data in GOLDEN["cls"].items():
        ours = o.cls_scores([r["answer_pred"] for r in data["rows"]], [r["answer_gt"] for r in data["rows"]])
        assert same(ours["accuracy"].value, data["metrics"]["accuracy"]), dataset


def test_rec_boxes_and_pixel_iou_equal_the_originals() -> None:
    """Spaces, words before the box, 4-digit and negative numbers, corners past 100 or reversed, ``<unk>``,
    fractional pixel boxes (held as float32), images that are not square."""
    for dataset, data in GOLDEN["rec"].items():
        rows = data["rows"]
        found = [((dataset, r["answer"]), o.rec_iou(r["answer"], r["bbox_xywh"], r["image_size"]), r["iou"])
                 for r in rows]
        ours = o.rec_scores([r["answer"] for r in rows], [r["bbox_xywh"] for r in rows],
                            [r["image_size"] for r in rows])
        found += [((dataset, "miou"), ours["miou"].value, data["metrics"]["miou"]),
                  ((dataset, "acc@0.5"), ours["acc@0.5"].value, data["metrics"]["acc"])]
        assert not mismatches(found)


def _report(data: dict, coco: bool) -> dict[str, cmoe_metrics.Metric]:
    return o.report_scores([r["answer_pred"] for r in data["rows"]], [r["answer_gt"] for r in data["rows"]],
                           coco=coco)


def test_report_rouge_and_f1_equal_the_originals() -> None:
    """Multi-sentence reports, empty samples dropped, a prediction that normalises to nothing, 40 periods."""
    for dataset, data in GOLDEN["report"].items():
        ours, theirs = _report(data, coco=False), data["metrics"]
        found = [((dataset, name), ours[ROUGE_NAMES[name]].value, value)
                 for name, value in theirs["rouge_scores"].items()]
        found.append(((dataset, "f1"), ours["f1"].value, theirs["f1_score"]))
        assert not mismatches(found)
        assert ours["meteor"].note == cmoe_metrics.COCO_OFF and "cider" not in ours


@needs_java
@pytest.mark.slow
def test_report_bleu_and_meteor_equal_the_originals() -> None:
    """pycocoevalcap's BLEU on the raw text, METEOR 1.5 on the normalised text (Java)."""
    for dataset, data in GOLDEN["report"].items():
        ours, theirs = _report(data, coco=True), data["metrics"]
        found = [((dataset, name), ours[name].value, value) for name, value in theirs["bleu_scores"].items()]
        found.append(((dataset, "meteor"), ours["meteor"].value, theirs["meteor_scores"]))
        assert not mismatches(found)


def test_where_the_protocols_differ() -> None:
    """The documented differences, on one example each."""
    assert 0 < o.sentence_bleu_unsmoothed("Yes", "yes")["bleu2"] < 1e-150  # unsmoothed: ≈ 0, not √0.1
    assert cmoe_metrics.sentence_bleu_scores(["Yes"], ["yes"])["bleu2"].value == pytest.approx(0.1 ** 0.5)
    assert o.original_f1("", "") == 0 and cmoe_metrics.unigram_f1("", "") == 1
    assert o.original_f1("lung lung", "lung liver") == pytest.approx(0.8)  # shared words counted in the prediction
    assert o.parse_box_original("the liver: {<10><20><30><40>}") is None  # must start with the box
    assert o.parse_box_original("{<10><20><300><40>}") == [10, 20, 300, 40]  # no clamping


def test_edge_cases_where_the_original_would_stop() -> None:
    assert o.pixel_iou([0, 0, -1, 5], [0, 0, -1, 0]) == 0.0  # zero-area union: the original divides by zero
    periods = "." * 80  # more than 2 × 32 periods survive both normalisations: the rouge package refuses it
    assert o.report_scores([periods, "normal lungs."], ["normal lungs.", "normal lungs."],
                           coco=False)["rougeL"].count == 1
    assert o.vqa_scores(["yes"], ["yes"], ["closed"])["open/f1"].note == cmoe_metrics.NO_SAMPLES  # not NaN


def test_rec_needs_the_pixel_box_and_unknown_tasks_are_named() -> None:
    with pytest.raises(CMoEError, match="needs the pixel box 'xywh' and 'image_size'"):
        o.evaluate_dataset("rec", ["{<1><2><3><4>}"], ["{<1><2><3><4>}"], [{"image_size": (10, 10)}])
    with pytest.raises(UnknownNameError, match="unknown task 'vq'"):
        o.evaluate_dataset("vq", [], [])
    assert o.evaluate_dataset("qa", ["yes"], ["yes"])["all/accuracy"].note == o.NO_TEXT_QA


def test_configs_choose_their_protocol() -> None:
    from cmoe.reference_models.unimed.config import load_config
    from cmoe.reference_models.unimed.experiments.runner import load_experiment

    assert load_config("paper").eval.protocol == "original"
    assert load_config(load_experiment("paper").base).eval.protocol == "original"
    assert load_config("tiny").eval.protocol == "cmoe" and load_config("tiny_random").eval.protocol == "cmoe"
    with pytest.raises(CMoEError, match="eval.protocol: expected original .* or cmoe"):
        load_config("tiny", {"eval": {"protocol": "paper"}})


def test_an_experiments_task_score_averages_the_tasks_datasets() -> None:
    from cmoe.reference_models.unimed.experiments.runner import _score

    Metric = cmoe_metrics.Metric
    per_dataset = {"vqa/slake_vqa": {"all/f1": Metric(0.2, 3)}, "vqa/pathvqa": {"all/f1": Metric(0.6, 2)},
                   "qa/medqa": {"all/accuracy": Metric.unavailable(o.NO_TEXT_QA)}}
    assert _score(per_dataset, "vqa") == pytest.approx(0.4) and _score(per_dataset, "qa") is None
    assert _score({"vqa": {"all/f1": Metric(0.3, 5)}}, "vqa") == 0.3  # cmoe: the task's own row


SMALL = ["--set", "data.synthetic.num_images=40", "--set", "data.synthetic.qa_questions=12",
         "--set", "data.synthetic.eval_images=10", "--set", "eval.limit_per_task=4", "--set", "eval.coco_caption=false"]


@pytest.mark.smoke
def test_eval_command_writes_tables_that_name_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``cmoe unimed eval --protocol original`` on the tiny config's data, with two datasets per VQA and REC task:
    one row per dataset, the limit per dataset, the original's dataset names; ``--protocol cmoe``: one row per
    task. The model is stubbed (its answers are the references), so only the evaluation path runs."""
    from cmoe.reference_models.unimed import cli
    from cmoe.reference_models.unimed.evaluation import evaluate

    real_load_split = evaluate.load_split

    def two_sources(section, split, text_processor="cmoe"):
        samples = real_load_split(section, split, text_processor)
        names = {"vqa": ("slake_vqa", "pathvqa"), "rec": ("slake_rec", "samed2d_rec")}
        seen: Counter[str] = Counter()
        for sample in samples:
            if sample.task in names:
                sample.source = names[sample.task][seen[sample.task] % 2]
                seen[sample.task] += 1
        return samples

    monkeypatch.setattr(evaluate, "load_split", two_sources)
    monkeypatch.setattr(evaluate, "load_trained_model", lambda config, checkpoint, device: (None, 0))
    monkeypatch.setattr(evaluate, "predict", lambda model, samples, config, device: [s.answer for s in samples])

    scored = ["--checkpoint", str(tmp_path / "step_00000007")]  # the model is stubbed: any checkpoint name
    assert cli.main(["eval", "--output-dir", str(tmp_path), "--protocol", "original", *scored, *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "Scoring protocol: original" in printed and "| vqa/slake_vqa | closed/accuracy | 100.00 | 4 |" in printed
    out = tmp_path / "eval" / "step_00000007-original"  # beside the checkpoint and protocol it scored
    table = (out / "eval.md").read_text()
    assert "Scoring protocol: original" in table and "vqa/slake_vqa = slakevqa_en" in table
    assert "rec/samed2d_rec = ref_sa_med" in table and "| task/dataset | metric |" in table
    written = json.loads((out / "eval.json").read_text())
    assert written["protocol"] == "original"
    assert {"vqa/slake_vqa", "vqa/pathvqa", "rec/slake_rec", "rec/samed2d_rec", "report/synthetic_report",
            "reg/synthetic_reg", "cls/synthetic_cls", "qa/synthetic_qa"} == \
        set(written) - {"protocol", "original_run", "checkpoint"}
    assert written["checkpoint"] == {"path": str(tmp_path / "step_00000007"), "step": 0}
    assert written["vqa/pathvqa"]["all/f1"] == {"value": 1.0, "count": 4, "note": ""}
    assert written["cls/synthetic_cls"]["accuracy"]["value"] == 1.0
    assert 0.5 < written["rec/slake_rec"]["miou"]["value"] < 1  # the reference box text, on the 0–100 grid
    assert written["qa/synthetic_qa"]["all/accuracy"]["note"] == o.NO_TEXT_QA

    assert cli.main(["eval", "--output-dir", str(tmp_path), "--out", str(tmp_path / "ours"), *scored, *SMALL]) == 0
    assert "Scoring protocol: cmoe" in capsys.readouterr().out  # the tiny config's default
    ours = json.loads((tmp_path / "ours" / "eval.json").read_text())
    assert ours["protocol"] == "cmoe"
    assert set(ours) - {"protocol", "original_run", "checkpoint"} == {"qa", "vqa", "report", "rec", "reg", "cls"}
    assert ours["vqa"]["all/f1"]["count"] == 4
    assert "Scoring protocol: cmoe" in (tmp_path / "ours" / "eval.md").read_text()
