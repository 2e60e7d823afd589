"""Text-only question answering: MedQA (USMLE, 4 options) and PubMedQA (PQA-L, yes/no/maybe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmoe.reference_models.unimed.data.loaders.common import (
    PathLike,
    _answer,
    _missing,
    _read_json,
    _read_jsonl,
    _root,
    _take,
    _words,
)
from cmoe.reference_models.unimed.data.sample import Sample


def load_medqa(root: PathLike, split: str = "train", limit: int | None = None) -> list[Sample]:
    """MedQA (USMLE, English): the question alone, no options (as Uni-Med), answer = the answer text.

    Layout: ``<root>/questions/US/{train,dev,test}.jsonl`` of the official release (``data_clean`` folder),
    one ``{"question", "answer", "options", "answer_idx", ...}`` object per line. ``meta`` keeps ``options``
    and ``answer_idx`` for a multiple-choice evaluation.
    """
    name = "medqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    rows = _read_jsonl(name, root / "questions" / "US" / f"{split}.jsonl", root)
    samples = (Sample("qa", {"question": _words(row["question"])}, _answer(row["answer"]), source=name,
                      meta={"options": row.get("options"), "answer_idx": row.get("answer_idx")})
               for row in rows)
    return _take(name, samples, limit)


def _pubmedqa_records(root: Path, split: str, fold: int) -> dict[str, dict[str, Any]]:
    name = "pubmedqa"
    set_files = ([root / "test_set.json"] if split == "test"
                 else [root / f"pqal_fold{fold}" / f"{split}_set.json", root / f"{split}_set.json"])
    for set_file in set_files:
        if set_file.exists():
            return _read_json(name, set_file, root, dict)
    if split == "dev":
        raise _missing(name, set_files[0], root)
    records = _read_json(name, root / "ori_pqal.json", root, dict)
    test_pmids = set(_read_json(name, root / "test_ground_truth.json", root))
    return {pmid: rec for pmid, rec in records.items() if (pmid in test_pmids) == (split == "test")}


def load_pubmedqa(root: PathLike, split: str = "train", fold: int = 0, limit: int | None = None) -> list[Sample]:
    """PubMedQA PQA-L: the question alone (no abstract context, as Uni-Med), answer yes/no/maybe.

    Splits, in order of preference: the official split script's files (``pqal_fold<fold>/{train,dev}_set.json``
    or ``{train,dev}_set.json`` in the root, and ``test_set.json`` — Uni-Med trains on ``train_set.json``); else
    ``ori_pqal.json`` split by ``test_ground_truth.json``: ``test`` = its 500 pmids, ``train`` = the other 500
    (the whole cross-validation pool); ``dev`` needs the split script's files. ``meta["pmid"]`` is kept.
    """
    name = "pubmedqa"
    root = _root(name, root, split, ("train", "dev", "test"))
    records = _pubmedqa_records(root, split, fold)
    samples = (Sample("qa", {"question": _words(rec["QUESTION"])}, _answer(rec["final_decision"]), source=name,
                      meta={"pmid": str(pmid)})
               for pmid, rec in records.items())
    return _take(name, samples, limit)
