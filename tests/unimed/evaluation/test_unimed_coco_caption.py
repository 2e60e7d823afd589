"""Report generation is scored with pycocoevalcap (PTB tokenizer, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr) on a
Java runtime: equal to the library's own ``COCOEvalCap`` pipeline; without Java the tables say how to get it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cmoe.reference_models.unimed.evaluation import coco_caption
from cmoe.reference_models.unimed.evaluation import metrics as m
from cmoe.reference_models.unimed.evaluation.evaluate import summary_table

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)

REFERENCES = ["The heart size is normal. No pleural effusion.", "Lungs are clear; no pneumothorax.",
              "Mild cardiomegaly with small left effusion.", "There is a fracture of the left radius."]
PREDICTIONS = ["The heart is normal, no effusion.", "lungs clear", "Cardiomegaly.", ""]

needs_java = pytest.mark.skipif(coco_caption.unavailable_reason() is not None,
                                reason=str(coco_caption.unavailable_reason()))


def _coco(captions: list[str]) -> SimpleNamespace:
    """The two things ``COCOEvalCap`` reads from a pycocotools ``COCO`` object."""
    anns = {i: [{"image_id": i, "caption": text}] for i, text in enumerate(captions)}
    return SimpleNamespace(imgToAnns=anns, getImgIds=lambda: list(anns))


@needs_java
@pytest.mark.slow
def test_report_metrics_equal_the_librarys_own_coco_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.eval as coco_eval

    results = m.evaluate_task("report", PREDICTIONS, REFERENCES)
    # COCOEvalCap as shipped, minus SPICE (it downloads Stanford CoreNLP models on first use: no network here),
    # with the METEOR 1.5 process already started (the same class; a second JVM would only cost start-up time)
    monkeypatch.setattr(coco_eval, "Meteor", coco_caption._shared_meteor)
    monkeypatch.setattr(coco_eval, "Spice", lambda: SimpleNamespace(
        method=lambda: "SPICE", compute_score=lambda gts, res: (0.0, [0.0] * len(gts))))
    evaluator = coco_eval.COCOEvalCap(_coco(REFERENCES), _coco(PREDICTIONS))
    evaluator.evaluate()
    expected = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4", "meteor": "METEOR",
                "coco_rougeL": "ROUGE_L", "cider": "CIDEr"}
    for ours, theirs in expected.items():
        assert results[ours].count == 4
        assert results[ours].value == pytest.approx(evaluator.eval[theirs], abs=1e-12), ours
    assert 0.1 < results["meteor"].value < 0.9 and results["cider"].value > 0
    identical = m.coco_caption_metrics(REFERENCES, REFERENCES)
    assert identical["bleu4"].value == pytest.approx(1.0) and identical["meteor"].value == pytest.approx(1.0)
    table = summary_table({"report": results})
    assert "METEOR n/a" not in table and f"METEOR {100 * results['meteor'].value:.1f}" in table


def test_without_java_the_table_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coco_caption.shutil, "which", lambda name: None)
    coco_caption.java_available.cache_clear()
    try:
        results = m.evaluate_task("report", PREDICTIONS, REFERENCES)
    finally:
        monkeypatch.undo()
        coco_caption.java_available.cache_clear()
    for name in coco_caption.COCO_METRICS:
        assert results[name].value is None and results[name].note == coco_caption.JAVA_MISSING
    assert results["rougeL"].value is not None  # the pure-Python metrics still run
    table = summary_table({"report": results})
    assert "BLEU-4 n/a" in table and "METEOR n/a" in table
    assert "apt-get install -y default-jre-headless" in table
    assert "n/a (apt" not in m.evaluate_task("report", [], [])["meteor"].note  # no samples: its own reason
