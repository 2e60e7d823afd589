"""``--protocol original``: every metric as the original Uni-Med code computes it (tsinghua-msiip/Uni-Med, commit
63b9dfb: ``evaluate_metrics.py``, ``eval_vqa.py``, ``eval_identify.py``, ``eval_caption.py``, ``eval_cls.py``,
``eval_ref.py``), one dataset at a time, so that on the same predictions the numbers equal the original code's
(and so are comparable with the paper's). ``tests/unimed/evaluation/test_unimed_original_protocol.py`` checks them against outputs
of the original's own code.

What the original does, and this module with it:

- Predictions are lower-cased, ``<unk>`` dropped and stripped (`clean_prediction`; REC: ``<unk>`` and every space
  dropped, case kept), then compared after `normalize_answer`: punctuation removed or turned into spaces (by a
  rule that looks at the whole string), at most 32 periods dropped, number words → digits, ``a``/``an``/``the``
  dropped, some contractions restored; apostrophes and symbols such as ``:%#&*`` stay.
- BLEU-1..4 (VQA, REG): NLTK ``sentence_bleu`` without smoothing on normalised words, averaged. A missing n-gram
  order makes BLEU-n tiny but not zero (NLTK puts the smallest float there), so one-word answers get BLEU-2..4 of
  about 1e-155.
- F1 (`original_f1`): a shared word counts as often as the prediction has it (recall can pass 1 before the mean);
  an empty prediction or reference scores 0, both empty too.
- Accuracy: VQA closed questions count a hit when the normalised reference is a substring of the normalised
  prediction (``no`` is in ``not``); REG and classification need equal normalised strings.
- Reports: samples with an empty reference or prediction are dropped; BLEU-1..4 is pycocoevalcap's corpus BLEU on
  the PTB-tokenised raw text; METEOR 1.5 (pycocoevalcap, Java) on normalised text; ROUGE-1/2/L are the ``rouge``
  package's F-scores (unique n-grams, ROUGE-L per sentence split on ``.``, no stemming) on text normalised twice
  (the original normalises in place before ROUGE and F1 normalise again: this only matters past 32 periods),
  a pair empty after that skipped; F1 likewise. No CIDEr.
- REC: the answer must start with ``{<x1><y1><x2><y2>}`` (1–3 digits each) after spaces are removed, else IoU 0;
  corners are scaled by /100 × the image size and compared with the exact pixel box ``[x, y, x+w, y+h]`` (as
  float32, as the original's tensors hold it) with the +1 pixel convention (`pixel_iou`): no clamping, no corner
  swapping (reversed corners overlap nothing and score 0, or -0.0, as there). ``acc@0.5`` is IoU > 0.5.
- Text QA: the original evaluates none, so the rows say so instead of a number (``--protocol cmoe`` scores it).

Where the original would stop with an error this module scores instead, and says so here: a REC union of zero
area scores IoU 0 (the original divides by zero), and a report pair the ``rouge`` package refuses (only periods
left after normalising twice) is skipped like an empty one. Empty splits are unavailable ("no samples") where
the original prints NaN. Means are numpy's, as the original's.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.evaluation.metrics import COCO_OFF, NO_SAMPLES, Metric, _check_inputs

NO_TEXT_QA = "the original evaluates no text QA; --protocol cmoe scores it"
ROUGE_MISSING = "needs the rouge package: pip install rouge==1.0.1 (or pip install -e '.[unimed]')"

# --- normalisation (evaluate_metrics.normalize_word) -----------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_->@`,?!<'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32
"""The original passes ``re.UNICODE`` (32) where ``re.sub`` takes its count: at most 32 periods go per call."""

# The original's table (its upper-case keys never match lower-cased words and are left out; so are the two that
# map a word to itself). ``somebody'd`` → ``somebodyd`` is the original's, backwards as it is.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're
whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
""".split())


def normalize_answer(text: str) -> str:
    """The original's answer normalisation (``normalize_word``), described in the module docstring.

    Each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` becomes a space, or is removed when the text has it
    next to a space or has a digit-comma-digit anywhere; then up to 32 periods not followed by a digit go.
    """
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in _PUNCTUATION:
        gone = remove_all or f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if gone else " ")
    result = _PERIOD.sub("", result, count=_MAX_PERIODS)
    words = [_NUMBER_WORDS.get(word, word) for word in result.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def clean_prediction(text: str) -> str:
    """A generated answer as the original's eval scripts keep it: lower-cased, ``<unk>`` dropped, stripped."""
    return text.lower().replace("<unk>", "").strip()


# --- per-pair scores --------------------------------------------------------------------------------------------

BLEU_WEIGHTS = {"bleu1": (1, 0, 0, 0), "bleu2": (1 / 2, 1 / 2), "bleu3": (1 / 3, 1 / 3, 1 / 3),
                "bleu4": (1 / 4, 1 / 4, 1 / 4, 1 / 4)}


def sentence_bleu_unsmoothed(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-1..4 of one pair: NLTK ``sentence_bleu`` without smoothing on `normalize_answer`'s words."""
    from nltk.translate.bleu_score import sentence_bleu

    hypothesis, truth = normalize_answer(prediction).split(), normalize_answer(reference).split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns for every missing n-gram order
        return {name: float(sentence_bleu([truth], hypothesis, weights=weights))
                for name, weights in BLEU_WEIGHTS.items()}


def original_f1(prediction: str, reference: str) -> float:
    """The original's word F1 after `normalize_answer`: shared words counted by their count in the prediction;
    0 when either side (or both) is empty or nothing is shared."""
    predicted, truth = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(reference).split())
    if not predicted or not truth:
        return 0.0
    true_positive = sum(count for word, count in predicted.items() if word in truth)
    if true_positive == 0:
        return 0.0
    precision = true_positive / sum(predicted.values())
    recall = true_positive / (true_positive + sum(count for word, count in truth.items() if word not in predicted))
    return 2 * precision * recall / (precision + recall)


def contains_accuracy(prediction: str, reference: str) -> int:
    """VQA closed-question hit: the normalised reference is a substring of the normalised prediction."""
    return int(normalize_answer(reference) in normalize_answer(prediction))


def exact_accuracy(prediction: str, reference: str) -> int:
    """REG / classification hit: equal normalised strings."""
    return int(normalize_answer(reference) == normalize_answer(prediction))


_BOX_PREFIX = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_DIGITS = re.compile(r"\d+")
BOX_SCALE = 100.0


def parse_box_original(answer: str) -> list[int] | None:
    """``[x1, y1, x2, y2]`` on the 0–100 grid when `answer`, with ``<unk>`` and spaces removed, starts with
    ``{<x1><y1><x2><y2>}`` (1–3 digits each); else None. Nothing is clamped or reordered."""
    text = answer.replace("<unk>", "").replace(" ", "").strip()
    if _BOX_PREFIX.match(text) is None:
        return None
    return [int(number) for number in _DIGITS.findall(text)[:4]]


def pixel_iou(box: Sequence[float], truth: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` pixel boxes with the +1 convention (an ``[a, a]`` span is one pixel wide),
    as the original's ``computeIoU``; no clamping or reordering, so reversed corners give what the formula gives.
    A union of zero area scores 0 (the original divides by zero)."""
    x1, y1, x2, y2 = box
    x3, y3, x4, y4 = truth
    overlap = max(0, min(x2, x4) - max(x1, x3) + 1) * max(0, min(y2, y4) - max(y1, y3) + 1)
    union = (x2 - x1 + 1) * (y2 - y1 + 1) + (x4 - x3 + 1) * (y4 - y3 + 1) - overlap
    return overlap / union if union != 0 else 0.0


def _float32(value: float) -> float:
    return float(np.float32(value))


def rec_iou(answer: str, xywh: Sequence[float], image_size: Sequence[float]) -> float:
    """One REC sample: the answer's box (`parse_box_original`, 0 when unreadable) scaled by /100 × the image's
    ``(width, height)`` against the pixel box ``xywh``; both held as float32 first, as the original's tensors."""
    corners = parse_box_original(answer)
    if corners is None:
        return 0.0
    x, y, w, h = (_float32(v) for v in xywh)
    width, height = (_float32(v) for v in image_size)
    scaled = [corners[0] / BOX_SCALE * width, corners[1] / BOX_SCALE * height,
              corners[2] / BOX_SCALE * width, corners[3] / BOX_SCALE * height]
    return pixel_iou(scaled, [x, y, x + w, y + h])


def rouge_package_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-scores of the ``rouge`` package (1.0.1, as the original) for one pair of non-empty texts."""
    from rouge import Rouge

    scores = Rouge().get_scores(prediction, reference)[0]
    return {"rouge1": scores["rouge-1"]["f"], "rouge2": scores["rouge-2"]["f"], "rougeL": scores["rouge-l"]["f"]}


# --- per-dataset metrics ----------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> Metric:
    """numpy's mean (pairwise summation, as the original's ``np.array(...).mean()``), or unavailable when empty."""
    return Metric(float(np.asarray(values, dtype=np.float64).mean()), len(values)) if values else \
        Metric.unavailable(NO_SAMPLES)


def _bleu_and_f1(pairs: Sequence[tuple[str, str]]) -> dict[str, Metric]:
    per_pair = [sentence_bleu_unsmoothed(p, r) for p, r in pairs]
    return {**{name: _mean([scores[name] for scores in per_pair]) for name in BLEU_WEIGHTS},
            "f1": _mean([original_f1(p, r) for p, r in pairs])}


def vqa_scores(predictions: Sequence[str], references: Sequence[str],
               answer_types: Sequence[str | None] | None = None) -> dict[str, Metric]:
    """``eval_vqa.py``: BLEU-1..4 and F1 for the ``open``, ``closed`` and ``all`` samples, and closed-question
    accuracy (`contains_accuracy`). `answer_types[i]` is ``open``/``closed`` (any case) or None (``all`` only)."""
    _check_inputs(predictions, references)
    types = [t.lower() if isinstance(t, str) else t for t in (answer_types or [None] * len(predictions))]
    if len(types) != len(predictions):
        raise CMoEError(f"answer types and predictions differ in length: {len(types)} answer types, "
                        f"{len(predictions)} predictions")
    pairs = [(clean_prediction(p), r) for p, r in zip(predictions, references)]
    results: dict[str, Metric] = {}
    for split in ("open", "closed", "all"):
        chosen = [pair for pair, kind in zip(pairs, types) if split in ("all", kind)]
        results.update({f"{split}/{name}": metric for name, metric in _bleu_and_f1(chosen).items()})
        if split == "closed":
            results["closed/accuracy"] = _mean([contains_accuracy(p, r) for p, r in chosen])
    return results


def reg_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """``eval_identify.py``: BLEU-1..4, F1 and exact-match accuracy of the object names."""
    _check_inputs(predictions, references)
    pairs = [(clean_prediction(p), r) for p, r in zip(predictions, references)]
    return {**_bleu_and_f1(pairs), "accuracy": _mean([exact_accuracy(p, r) for p, r in pairs])}


def cls_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """``eval_cls.py``: exact-match accuracy of the class names."""
    _check_inputs(predictions, references)
    return {"accuracy": _mean([exact_accuracy(clean_prediction(p), r) for p, r in zip(predictions, references)])}


def rec_scores(predictions: Sequence[str], boxes_xywh: Sequence[Sequence[float]],
               image_sizes: Sequence[Sequence[float]]) -> dict[str, Metric]:
    """``eval_ref.py``: mean IoU (`rec_iou`) and ``acc@0.5`` (IoU > 0.5) against pixel boxes ``[x, y, w, h]`` on
    images of ``(width, height)``."""
    _check_inputs(predictions, boxes_xywh, text_references=False)
    if len(image_sizes) != len(predictions):
        raise CMoEError(f"image sizes and predictions differ in length: {len(image_sizes)} image sizes, "
                        f"{len(predictions)} predictions")
    ious = [rec_iou(p, box, size) for p, box, size in zip(predictions, boxes_xywh, image_sizes)]
    return {"miou": _mean(ious), "acc@0.5": _mean([int(iou > 0.5) for iou in ious])}


def _coco(function_name: str, predictions: list[str], references: list[str], names: Sequence[str],
          coco: bool) -> dict[str, Metric]:
    """pycocoevalcap's BLEU or METEOR as metrics, or each unavailable with the reason (off, no Java, no samples)."""
    from cmoe.reference_models.unimed.evaluation import coco_caption

    if not coco:
        return {name: Metric.unavailable(COCO_OFF) for name in names}
    if not predictions:
        return {name: Metric.unavailable(NO_SAMPLES) for name in names}
    try:
        value = getattr(coco_caption, function_name)(predictions, references)
    except RuntimeError as error:
        return {name: Metric.unavailable(str(error)) for name in names}
    except (ValueError, OSError) as error:  # the Java process died: say so, no number
        coco_caption.close_meteor()
        return {name: Metric.unavailable(f"pycocoevalcap failed: {error}") for name in names}
    values = value if isinstance(value, dict) else {names[0]: value}
    return {name: Metric(values[name], len(predictions)) for name in names}


def report_scores(predictions: Sequence[str], references: Sequence[str], coco: bool = True) -> dict[str, Metric]:
    """``eval_caption.py``: BLEU-1..4 and METEOR (pycocoevalcap; ``coco=False`` skips these Java metrics),
    ROUGE-1/2/L (``rouge`` package) and F1, on the samples whose reference and prediction are non-empty."""
    _check_inputs(predictions, references)
    kept = [(p, r) for p, r in ((clean_prediction(p), r) for p, r in zip(predictions, references)) if p and r]
    results = _coco("bleu_scores", [p for p, _ in kept], [r for _, r in kept], list(BLEU_WEIGHTS), coco)
    once = [(normalize_answer(p), normalize_answer(r)) for p, r in kept]
    results.update(_coco("meteor_score", [p for p, _ in once], [r for _, r in once], ["meteor"], coco))
    results.update(_rouge(once))
    results["f1"] = _mean([original_f1(p, r) for p, r in once])
    return results


def _rouge(once: Sequence[tuple[str, str]]) -> dict[str, Metric]:
    names = ("rouge1", "rouge2", "rougeL")
    try:
        import rouge  # noqa: F401
    except ImportError:
        return {name: Metric.unavailable(ROUGE_MISSING) for name in names}
    scores = []
    for prediction, reference in once:
        prediction, reference = normalize_answer(prediction), normalize_answer(reference)
        if not prediction or not reference:
            continue
        try:
            scores.append(rouge_package_scores(prediction, reference))
        except ValueError:  # nothing but periods left: the package refuses the pair, the original would stop
            continue
    return {name: _mean([s[name] for s in scores]) for name in names}


def qa_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Metric]:
    """Text QA: the original evaluates none, so ``all/accuracy`` is unavailable and says so."""
    _check_inputs(predictions, references)
    return {"all/accuracy": Metric.unavailable(NO_TEXT_QA)}


def _rec_inputs(meta: Sequence[dict[str, Any]] | None, count: int) -> tuple[list[Any], list[Any]]:
    if meta is None or len(meta) != count:
        raise CMoEError(f"REC under --protocol original needs one meta entry per prediction ({count}), got "
                        f"{'none' if meta is None else len(meta)}; pass the samples' meta")
    for i, entry in enumerate(meta):
        if entry.get("xywh") is None or entry.get("image_size") is None:
            raise CMoEError(f"meta[{i}]: REC under --protocol original needs the pixel box 'xywh' and "
                            "'image_size' (the recipe's loaders and synthetic set give both); reload the data "
                            "with this version, or use --protocol cmoe")
    return [entry["xywh"] for entry in meta], [entry["image_size"] for entry in meta]


TASKS = ("qa", "vqa", "report", "rec", "reg", "cls")


def evaluate_dataset(task: str, predictions: Sequence[str], references: Sequence[Any],
                     meta: Sequence[dict[str, Any]] | None = None, coco: bool = True) -> dict[str, Metric]:
    """Every metric the original reports for one dataset of `task` (``qa``, ``vqa``, ``report``, ``rec``,
    ``reg``, ``cls``). `meta[i]` gives ``answer_type`` (VQA) and ``xywh`` + ``image_size`` (REC, required)."""
    if task not in TASKS:
        raise UnknownNameError("task", task, TASKS)
    if task == "vqa":
        types = None if meta is None else [m.get("answer_type") for m in meta]
        return vqa_scores(predictions, references, types)
    if task == "rec":
        boxes, sizes = _rec_inputs(meta, len(predictions))
        return rec_scores(predictions, boxes, sizes)
    if task == "report":
        return report_scores(predictions, references, coco)
    return {"qa": qa_scores, "reg": reg_scores, "cls": cls_scores}[task](predictions, references)
