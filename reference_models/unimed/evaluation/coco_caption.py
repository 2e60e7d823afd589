"""The COCO caption evaluation with ``pycocoevalcap``: its Stanford PTB tokenizer, BLEU-1..4, METEOR 1.5, ROUGE-L
and CIDEr (one reference per sample). The original Uni-Med scores reports' BLEU with it (`bleu_scores`) and METEOR on
its normalised text (`meteor_score`); it reports no CIDEr nor this ROUGE-L (see `original_protocol`).

The tokenizer and METEOR are Java programs shipped inside ``pycocoevalcap``; they need a Java runtime on the
PATH (Debian: ``apt-get install -y default-jre-headless``). Without Java, or without the package, every metric
here is unavailable with a note saying how to get it, never a substitute number. METEOR's JVM loads a 60 MB
paraphrase table when it starts (seconds), so one METEOR process is kept for the life of this process.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

JAVA_MISSING = ("needs a Java runtime for pycocoevalcap (PTB tokenizer, METEOR 1.5): apt-get install -y "
                "default-jre-headless (Debian/Ubuntu, as root), or put any Java 8+ `java` on the PATH")
PACKAGE_MISSING = "needs pycocoevalcap: pip install pycocoevalcap (or pip install -e '.[unimed]')"
COCO_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "coco_rougeL", "cider")

_meteor: Any = None
_meteor_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def java_available() -> bool:
    """Whether a ``java`` that runs is on the PATH (checked once per process)."""
    java = shutil.which("java")
    if java is None:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def unavailable_reason() -> str | None:
    """Why the COCO caption metrics cannot run here (package or Java missing), or None when they can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return PACKAGE_MISSING
    return None if java_available() else JAVA_MISSING


def _shared_meteor() -> Any:
    """One METEOR 1.5 process for this Python process (closed at exit)."""
    global _meteor
    with _meteor_lock:
        if _meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            _meteor = Meteor()
            atexit.register(close_meteor)
        return _meteor


def close_meteor() -> None:
    """Stop the shared METEOR process, if one runs (the next score starts a new one)."""
    global _meteor
    with _meteor_lock:
        meteor, _meteor = _meteor, None
    if meteor is not None:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def coco_caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus scores of `predictions` against one reference each, as ``COCOEvalCap`` computes them: both sides
    PTB-tokenised (lower-cased, punctuation dropped), then BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D). Raises
    `RuntimeError` with `unavailable_reason` when the package or Java is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenized(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, _ = _shared_meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"bleu{n + 1}": float(bleu[n]) for n in range(4)}, "meteor": float(meteor),
            "coco_rougeL": float(rouge), "cider": float(cider)}


def _tokenized(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict, dict]:
    """References and predictions PTB-tokenised (lower-cased, punctuation dropped), keyed by sample index."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    return (tokenizer.tokenize({i: [{"caption": text}] for i, text in enumerate(references)}),
            tokenizer.tokenize({i: [{"caption": text}] for i, text in enumerate(predictions)}))


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 of pycocoevalcap on PTB-tokenised text (``bleu1`` … ``bleu4``); raises `RuntimeError`
    with `unavailable_reason` when the package or Java is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from pycocoevalcap.bleu.bleu import Bleu

    bleu, _ = Bleu(4).compute_score(*_tokenized(predictions, references), verbose=0)
    return {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}


def meteor_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus METEOR 1.5 of pycocoevalcap on PTB-tokenised text; raises `RuntimeError` with
    `unavailable_reason` when the package or Java is missing."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    meteor, _ = _shared_meteor().compute_score(*_tokenized(predictions, references))
    return float(meteor)
