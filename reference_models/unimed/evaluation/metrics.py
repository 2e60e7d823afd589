"""Uni-Med's evaluation metrics as ``--protocol cmoe`` computes them, offline: pure functions over prediction and
reference strings. ``original_protocol`` reproduces the original code's own numbers instead (its normalisation,
unsmoothed BLEU, its F1, the ``rouge`` package, strict box parsing, per dataset).

Every metric is a `Metric`: a value in 0–1 over ``count`` samples, or ``value=None`` with a ``note`` saying why
there is none (no samples, or a missing Java runtime for the COCO caption metrics), so tables print
``n/a (reason)`` instead of a wrong number. Reports are scored with the COCO caption evaluation of pycocoevalcap
(`coco_caption`: PTB tokenizer, BLEU, METEOR 1.5, ROUGE-L, CIDEr; Java programs). `evaluate_task` dispatches by task name (``qa``, ``vqa``,
``report``, ``rec``, ``reg``, ``cls``).

Text is compared after `normalize_text` (lowercase, punctuation dropped, whitespace collapsed) and split on
spaces; nothing here needs NLTK data files (no ``word_tokenize``) and nothing downloads. Predictions should
already be cleaned with `clean_answer` (``</s>`` dropped, 50 words). BLEU uses NLTK's smoothing method 1
(a zero n-gram count becomes 0.1), so one-word answers get a finite BLEU-2..4 (e.g. BLEU-2 = √0.1 for an exact
one-word match) instead of the original's unsmoothed ≈0 with a warning; BLEU-1 is unaffected. NLTK and
rouge_score are imported when first used, so importing this module needs neither.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.boxes import Box, box_iou, parse_box

METEOR_NEEDS_WORDNET = "needs NLTK's WordNet data: run python -m nltk.downloader wordnet where a network is allowed"
NO_SAMPLES = "no samples"
YES_NO_MAYBE = ("yes", "no", "maybe")
BLEU_WEIGHTS = {f"bleu{n}": (1.0 / n,) * n for n in range(1, 5)}


@dataclass(frozen=True)
class Metric:
    """A score in 0–1 over `count` samples, or ``value=None`` with a `note` saying why it is unavailable."""

    value: float | None
    count: int = 0
    note: str = ""

    @classmethod
    def unavailable(cls, note: str) -> Metric:
        """A metric that could not be computed, and why."""
        return cls(None, 0, note)

    @property
    def available(self) -> bool:
        return self.value is not None

    def __str__(self) -> str:
        return f"{self.value:.4f}" if self.value is not None else f"n/a ({self.note})"


def _mean(scores: Sequence[float]) -> Metric:
    return Metric(fmean(scores), len(scores)) if scores else Metric.unavailable(NO_SAMPLES)


_APOSTROPHES = re.compile(r"['’`]")
_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")


def normalize_text(text: str) -> str:
    """Lowercase, apostrophes dropped, other punctuation → space (a decimal point between digits is kept),
    whitespace collapsed: the VQA-style normalisation every metric here compares on."""
    text = _APOSTROPHES.sub("", text.lower())
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def tokenize(text: str) -> list[str]:
    """The words of `normalize_text(text)`: the tokenisation used by BLEU, F1 and METEOR."""
    return normalize_text(text).split()


def _check_inputs(predictions: Sequence[Any], references: Sequence[Any], text_references: bool = True) -> None:
    if len(predictions) != len(references):
        raise CMoEError(f"predictions and references differ in length: {len(predictions)} predictions, "
                        f"{len(references)} references")
    for i, prediction in enumerate(predictions):
        if not isinstance(prediction, str):
            raise CMoEError(f"predictions[{i}]: expected a string, got {type(prediction).__name__} {prediction!r}")
    for i, reference in enumerate(references if text_references else ()):
        if not isinstance(reference, str):
            raise CMoEError(f"references[{i}]: expected a string, got {type(reference).__name__} {reference!r}")


def unigram_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of one pair: shared tokens counted with multiplicity (Counter intersection).

    The original counted a shared word by its count in the prediction only; the two agree unless words repeat.
    Both empty → 1, one empty → 0.
    """
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_unigram_f1(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """`unigram_f1` averaged over the samples."""
    _check_inputs(predictions, references)
    return _mean([unigram_f1(p, r) for p, r in zip(predictions, references)])


def _smoothing() -> Callable[..., Any]:
    from nltk.translate.bleu_score import SmoothingFunction
    return SmoothingFunction().method1


def sentence_bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """BLEU-1..4 (uniform weights) per sample with NLTK's ``sentence_bleu``, averaged, as the original VQA and
    REG evaluation does; smoothing method 1 (see the module docstring)."""
    from nltk.translate.bleu_score import sentence_bleu

    _check_inputs(predictions, references)
    smoothing = _smoothing()
    pairs = [(tokenize(p), tokenize(r)) for p, r in zip(predictions, references)]
    return {name: _mean([sentence_bleu([ref], pred, weights=weights, smoothing_function=smoothing)
                         for pred, ref in pairs])
            for name, weights in BLEU_WEIGHTS.items()}


def corpus_bleu4(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """(Not used by the evaluation tables: see `coco_caption_metrics`.) Corpus-level BLEU-4 with NLTK's ``corpus_bleu`` over `tokenize`'d text, smoothing method 1.

    The original used pycocoevalcap's BLEU on text tokenised by the (Java) PTB tokenizer, which we do not run:
    the numbers are comparable in spirit, not digit for digit.
    """
    from nltk.translate.bleu_score import corpus_bleu

    _check_inputs(predictions, references)
    if not predictions:
        return Metric.unavailable(NO_SAMPLES)
    value = corpus_bleu([[tokenize(r)] for r in references], [tokenize(p) for p in predictions],
                        smoothing_function=_smoothing())
    return Metric(float(value), len(predictions))


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures per sample (``rouge_score``, Porter stemmer, its own
    tokenizer), averaged; the original used the ``rouge`` package instead (see `original_protocol`)."""
    from rouge_score import rouge_scorer

    _check_inputs(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {kind: _mean([s[kind].fmeasure for s in scores]) for kind in kinds}


def wordnet_available() -> bool:
    """Whether NLTK's WordNet corpus is installed locally (METEOR's synonym stage needs it); never downloads."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return False
    return True


def _wordnet() -> Any:
    from nltk.corpus import wordnet
    return wordnet


def meteor(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """(Not used by the evaluation tables, which run METEOR 1.5 itself: see `coco_caption_metrics`.)
    NLTK's sentence METEOR (exact, Porter-stem and WordNet-synonym matches) averaged over the samples, or
    unavailable with the reason when WordNet is not installed; a missing corpus never becomes a wrong number.

    The original ran pycocoevalcap's Java METEOR 1.5, so the values are comparable in spirit only.
    """
    from nltk.translate.meteor_score import single_meteor_score

    _check_inputs(predictions, references)
    if not wordnet_available():
        return Metric.unavailable(METEOR_NEEDS_WORDNET)
    wordnet = _wordnet()
    return _mean([single_meteor_score(tokenize(r), tokenize(p), wordnet=wordnet)
                  for p, r in zip(predictions, references)])


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """Fraction of predictions equal to their reference after `normalize_text`."""
    _check_inputs(predictions, references)
    return _mean([float(normalize_text(p) == normalize_text(r)) for p, r in zip(predictions, references)])


def closed_accuracy(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """The original's closed-question accuracy: the normalised reference is a substring of the normalised
    prediction. Substring, as in the original: reference ``no`` also matches a prediction ``not``."""
    _check_inputs(predictions, references)
    return _mean([float(normalize_text(r) in normalize_text(p)) for p, r in zip(predictions, references)])


def vqa_metrics(predictions: Sequence[str], references: Sequence[str],
                answer_types: Sequence[str | None] | None = None) -> dict[str, Metric]:
    """BLEU-1..4 and unigram F1 for the ``open``, ``closed`` and ``all`` samples, plus ``closed/accuracy``.

    `answer_types[i]` is ``open`` or ``closed`` (any case, as SLAKE writes ``OPEN``) or None; samples without
    a type count only in ``all``. Keys look like ``open/bleu1``, ``all/f1``, ``closed/accuracy``.
    """
    _check_inputs(predictions, references)
    types = list(answer_types) if answer_types is not None else [None] * len(predictions)
    if len(types) != len(predictions):
        raise CMoEError(f"answer types and predictions differ in length: {len(types)} answer types, "
                        f"{len(predictions)} predictions")
    types = [t.lower() if isinstance(t, str) else t for t in types]
    for i, kind in enumerate(types):
        if kind not in ("open", "closed", None):
            raise CMoEError(f"answer_types[{i}]: expected 'open', 'closed' or None, got {answer_types[i]!r}")
    results: dict[str, Metric] = {}
    for split in ("open", "closed", "all"):
        chosen = [i for i, kind in enumerate(types) if split in ("all", kind)]
        preds, refs = [predictions[i] for i in chosen], [references[i] for i in chosen]
        for name, metric in sentence_bleu_scores(preds, refs).items():
            results[f"{split}/{name}"] = metric
        results[f"{split}/f1"] = mean_unigram_f1(preds, refs)
        if split == "closed":
            results["closed/accuracy"] = closed_accuracy(preds, refs)
    return results


COCO_OFF = "off in this run (eval.coco_caption: false)"


def coco_caption_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """The COCO caption evaluation (`coco_caption`): PTB tokenisation, BLEU-1..4, METEOR 1.5, ROUGE-L
    (``coco_rougeL``) and CIDEr, as the original scores reports; each unavailable, with how to get Java or the
    package, where they are missing."""
    from cmoe.reference_models.unimed.evaluation import coco_caption

    _check_inputs(predictions, references)
    if not predictions:
        return {name: Metric.unavailable(NO_SAMPLES) for name in coco_caption.COCO_METRICS}
    try:
        scores = coco_caption.coco_caption_scores(predictions, references)
    except RuntimeError as error:
        return {name: Metric.unavailable(str(error)) for name in coco_caption.COCO_METRICS}
    except (ValueError, OSError) as error:  # the Java process died (e.g. out of memory): say so, no number
        coco_caption.close_meteor()
        return {name: Metric.unavailable(f"pycocoevalcap failed: {error}") for name in coco_caption.COCO_METRICS}
    return {name: Metric(value, len(predictions)) for name, value in scores.items()}


def report_metrics(predictions: Sequence[str], references: Sequence[str], coco: bool = True) -> dict[str, Metric]:
    """Report generation: the COCO caption metrics (BLEU-1..4, METEOR 1.5, ``coco_rougeL``, CIDEr; see
    `coco_caption_metrics`), ROUGE-1/2/L F-measures per sample (``rouge_score``) and unigram F1. ``coco=False`` skips the Java metrics (listed as unavailable)."""
    if coco:
        coco_scores = coco_caption_metrics(predictions, references)
    else:
        from cmoe.reference_models.unimed.evaluation.coco_caption import COCO_METRICS

        coco_scores = {name: Metric.unavailable(COCO_OFF) for name in COCO_METRICS}
    return {**coco_scores, **rouge_scores(predictions, references), "f1": mean_unigram_f1(predictions, references)}


def _reference_box(reference: Box | str, index: int) -> Box:
    if isinstance(reference, Box):
        return reference
    box = parse_box(reference) if isinstance(reference, str) else None
    if box is None:
        raise CMoEError(f"references[{index}]: expected a Box or box text like '{{<10><20><30><40>}}', "
                        f"got {reference!r}")
    return box


def rec_metrics(predictions: Sequence[str], references: Sequence[Box | str]) -> dict[str, Metric]:
    """Referring expression comprehension: mean IoU, ``acc@0.5`` (IoU strictly above 0.5, as the original)
    and the fraction of predictions `parse_box` cannot read (those score IoU 0)."""
    _check_inputs(predictions, references, text_references=False)
    truths = [_reference_box(r, i) for i, r in enumerate(references)]
    boxes = [parse_box(p) for p in predictions]
    ious = [box_iou(box, truth) for box, truth in zip(boxes, truths)]
    return {"miou": _mean(ious), "acc@0.5": _mean([float(iou > 0.5) for iou in ious]),
            "parse_failure_rate": _mean([float(box is None) for box in boxes])}


def reg_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """Referring expression generation: sentence BLEU-1..4, unigram F1 and exact-match accuracy."""
    return {**sentence_bleu_scores(predictions, references), "f1": mean_unigram_f1(predictions, references),
            "accuracy": exact_match(predictions, references)}


def cls_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """Image classification: exact-match accuracy of the class name."""
    return {"accuracy": exact_match(predictions, references)}


def _first_yes_no_maybe(text: str) -> str | None:
    return next((word for word in tokenize(text) if word in YES_NO_MAYBE), None)


def qa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """Text QA accuracy (the original has none): ``yes_no_maybe/accuracy``, ``free_text/accuracy``, ``all/accuracy``.

    A reference that normalises to ``yes``, ``no`` or ``maybe`` (PubMedQA) is matched by the first of those
    words in the prediction ("No, it is not." → ``no``); any other reference (MedQA) needs an exact match
    after `normalize_text`.
    """
    _check_inputs(predictions, references)
    scores: dict[str, list[float]] = {"yes_no_maybe": [], "free_text": []}
    for prediction, reference in zip(predictions, references):
        ref = normalize_text(reference)
        if ref in YES_NO_MAYBE:
            scores["yes_no_maybe"].append(float(_first_yes_no_maybe(prediction) == ref))
        else:
            scores["free_text"].append(float(normalize_text(prediction) == ref))
    return {"yes_no_maybe/accuracy": _mean(scores["yes_no_maybe"]),
            "free_text/accuracy": _mean(scores["free_text"]),
            "all/accuracy": _mean(scores["yes_no_maybe"] + scores["free_text"])}


def _meta_field(meta: Sequence[dict[str, Any]] | None, field: str, n: int) -> list[Any] | None:
    if meta is None:
        return None
    if len(meta) != n:
        raise CMoEError(f"meta and predictions differ in length: {len(meta)} meta entries, {n} predictions")
    return [m.get(field) for m in meta]


def _evaluate_vqa(predictions: Sequence[str], references: Sequence[str],
                  meta: Sequence[dict[str, Any]] | None) -> dict[str, Metric]:
    return vqa_metrics(predictions, references, _meta_field(meta, "answer_type", len(predictions)))


def _evaluate_rec(predictions: Sequence[str], references: Sequence[Box | str],
                  meta: Sequence[dict[str, Any]] | None) -> dict[str, Metric]:
    _check_inputs(predictions, references, text_references=False)
    boxes = _meta_field(meta, "box", len(predictions)) or [None] * len(predictions)
    return rec_metrics(predictions, [box if box is not None else ref for box, ref in zip(boxes, references)])


EVALUATORS: dict[str, Callable[[Sequence[str], Sequence[Any], Sequence[dict[str, Any]] | None],
                               dict[str, Metric]]] = {
    "qa": lambda p, r, m: qa_accuracy(p, r),
    "vqa": _evaluate_vqa,
    "report": lambda p, r, m: report_metrics(p, r),
    "rec": _evaluate_rec,
    "reg": lambda p, r, m: reg_metrics(p, r),
    "cls": lambda p, r, m: cls_metrics(p, r),
}


def evaluate_task(task: str, predictions: Sequence[str], references: Sequence[Any],
                  meta: Sequence[dict[str, Any]] | None = None, coco: bool = True) -> dict[str, Metric]:
    """All metrics of `task` (``qa``, ``vqa``, ``report``, ``rec``, ``reg``, ``cls``) as ``name → Metric``.

    `meta[i]` may hold ``answer_type`` (``open``/``closed``) for VQA and ``box`` (a `Box` or box text, used
    instead of `references[i]`) for REC. Empty inputs give unavailable metrics, not an error. ``coco=False``
    skips the Java COCO caption metrics of ``report``.
    """
    if task not in EVALUATORS:
        raise UnknownNameError("task", task, EVALUATORS)
    if task == "report":
        return report_metrics(predictions, references, coco)
    return EVALUATORS[task](predictions, references, meta)
