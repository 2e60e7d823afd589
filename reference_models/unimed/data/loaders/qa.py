"""Text-only question answering: MedQA (USMLE, 4 options) and PubMedQA (PQA-L, yes/no/maybe).

The original passes the whole QA instruction (``[qa]``, the template and the question) through its text
processor, which cuts it to 50 words (``uni_med/datasets/datasets/medqa_dataset.py``, ``pubmedqa_dataset.py``);
``instruction_words`` (default 50) does the same to our instruction, so the question keeps 50 minus the
template's 12 words. Most MedQA questions are longer (a case vignette that ends with the question asked), so
``instruction_words: null``, which keeps the whole question, is the better choice for new runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmoe.errors import expect
from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _cut,
    _missing,
    _read_json,
    _read_jsonl,
    _root,
    _take,
    _words,
)
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.tasks import TASKS
from cmoe.reference_models.unimed.text_processing import current_text_processor


def question_words(instruction_words: int | None) -> int | None:
    """How many words of the question fit an instruction of `instruction_words` words after the ``qa`` task's
    identifier and template (None: all of them)."""
    if instruction_words is None:
        return None
    template = len(TASKS["qa"].instruction(question="").split())
    return max(0, instruction_words - template)


def _question(name: str, value: object, instruction_words: int | None) -> str:
    """The question as the instruction will hold it: under the ``original`` text processor unchanged (the
    original processes the whole instruction once its template is drawn: `prompts.qa_instruction`), under
    ``cmoe`` whitespace-collapsed and cut to fit ``instruction_words`` after our template."""
    expect(instruction_words is None or (isinstance(instruction_words, int) and instruction_words > 0),
           f"{name}: instruction_words", "None (keep the whole question) or a positive int", repr(instruction_words))
    if current_text_processor() == "original":
        return str(value)
    keep = question_words(instruction_words)
    return _words(value) if keep is None else _cut(value, keep) if keep else ""


def load_medqa(root: PathLike, split: str = "train", instruction_words: int | None = 50,
               limit: int | None = None) -> list[Sample]:
    """MedQA (USMLE, English): the question alone, no options (as Uni-Med), answer = the answer text.

    Layout: ``<root>/questions/US/{train,dev,test}.jsonl`` of the official release (``data_clean`` folder),
    one ``{"question", "answer", "options", "answer_idx", ...}`` object per line. The question is cut so that the
    whole instruction has at most ``instruction_words`` words, as the original does (None keeps it whole: ours).
    ``meta`` keeps ``options`` and ``answer_idx`` for a multiple-choice evaluation.
    """
    name = "medqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    _question(name, "", instruction_words)
    rows = _read_jsonl(name, root / "questions" / "US" / f"{split}.jsonl", root)
    samples = (Sample("qa", {"question": _question(name, row["question"], instruction_words)},
                      _answer(row["answer"]), source=name,
                      meta={"options": row.get("options"), "answer_idx": row.get("answer_idx"),
                            "instruction_words": instruction_words})
               for row in rows)
    return _take(name, samples, limit)


def _pubmedqa_records(root: Path, split: str, fold: int) -> dict[str, dict[str, Any]]:
    name = "pubmedqa"
    set_files = ([root / "test_set.json"] if split == "test"
                 else [root / f"pqal_fold{fold}" / f"{split}_set.json", root / f"{split}_set.json"])
    for set_file in set_files:
        if set_file.exists():
            return _read_json(name, set_file, root, dict)
    split_script = any(root.glob("*_set.json")) or any(root.glob("pqal_fold*"))
    if split == "dev" or (split_script and not (root / "ori_pqal.json").exists()):
        raise _missing(name, set_files[0], root)
    records = _read_json(name, root / "ori_pqal.json", root, dict)
    test_pmids = set(_read_json(name, root / "test_ground_truth.json", root))
    return {pmid: rec for pmid, rec in records.items() if (pmid in test_pmids) == (split == "test")}


def load_pubmedqa(root: PathLike, split: str = "train", fold: int = 0, instruction_words: int | None = 50,
                  limit: int | None = None) -> list[Sample]:
    """PubMedQA PQA-L: the question alone (no abstract context, as Uni-Med), answer yes/no/maybe.

    Splits, in order of preference: the official split script's files (``pqal_fold<fold>/{train,dev}_set.json``
    or ``{train,dev}_set.json`` in the root, and ``test_set.json`` — Uni-Med trains on ``<root>/train_set.json``);
    else ``ori_pqal.json`` split by ``test_ground_truth.json``: ``test`` = its 500 pmids, ``train`` = the other
    500 (the whole cross-validation pool); ``dev`` needs the split script's files. The question is cut as in
    `load_medqa` (``instruction_words``). ``meta["pmid"]`` is kept.
    """
    name = "pubmedqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    _question(name, "", instruction_words)
    records = _pubmedqa_records(root, split, fold)
    samples = (Sample("qa", {"question": _question(name, rec["QUESTION"], instruction_words)},
                      _answer(rec["final_decision"]), source=name,
                      meta={"pmid": str(pmid), "instruction_words": instruction_words})
               for pmid, rec in records.items())
    return _take(name, samples, limit)
