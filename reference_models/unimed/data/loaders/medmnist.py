"""MedMNIST v2 classification: DermaMNIST and OrganSMNIST, with the original's questions and answers."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np

from cmoe.reference_models.unimed.data.loaders.common import (
    MalformedDataError,
    PathLike,
    _check_limit,
    _malformed,
    _missing,
    _root,
    _take,
)
from cmoe.reference_models.unimed.data.loaders.layouts import LAYOUTS
from cmoe.reference_models.unimed.data.medmnist_classes import OFFICIAL_LABELS, QUESTIONS, answer_name
from cmoe.reference_models.unimed.data.sample import Sample


def _medmnist(flag: str, root: PathLike, split: str, size: int | None, limit: int | None) -> list[Sample]:
    root = _root(flag, root, split, ("train", "val", "test"))
    _check_limit(flag, limit)
    if size is None:
        candidates = [root / f"{flag}_224.npz", root / f"{flag}.npz"]
    else:
        candidates = [root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")]
    path = next((c for c in candidates if c.exists()), None)
    if path is None:
        raise _missing(flag, candidates[0], root)
    labels_official = OFFICIAL_LABELS[flag]
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise _malformed(flag, path, f"not a NumPy .npz archive ({type(error).__name__})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _malformed(flag, path, "a single .npy array, not an .npz archive of arrays")
    with archive:
        keys = (f"{split}_images", f"{split}_labels")
        absent = [key for key in keys if key not in archive.files]
        if absent:
            raise MalformedDataError(f"{flag}: {path} lacks {absent}; expected {LAYOUTS[flag]}")
        try:
            all_labels = archive[keys[1]]
            images = archive[keys[0]] if limit is None else archive[keys[0]][:limit].copy()
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
            raise _malformed(flag, path, f"a damaged archive ({type(error).__name__}: {error})") from None
        if len(all_labels) < len(images):
            raise _malformed(flag, path, f"{keys[1]} has {len(all_labels)} labels for {len(images)} images")
        labels = all_labels.reshape(len(all_labels), -1)[:len(images), 0]
    bad = [(i, label) for i, label in enumerate(labels)
           if not float(label).is_integer() or not 0 <= int(label) < len(labels_official)]
    if bad:
        raise _malformed(flag, path, f"{keys[1]}[{bad[0][0]}] = {bad[0][1]!r} is not a class index in "
                                     f"0..{len(labels_official) - 1}")
    samples = (Sample("cls", {"question": QUESTIONS[flag]}, answer_name(labels_official[int(label)]), images[i],
                      f"{flag}/{split}/{i}", flag, {"label": int(label), "label_name": labels_official[int(label)]})
               for i, label in enumerate(labels))
    return _take(flag, samples, limit)


def load_dermamnist(root: PathLike, split: str = "train", size: int | None = None,
                    limit: int | None = None) -> list[Sample]:
    """DermaMNIST (7 skin-lesion classes) classification with Uni-Med's fixed question.

    ``<root>/dermamnist_224.npz`` (Uni-Med trains at 224 px) or ``dermamnist.npz`` (28 px) — the first
    present, or exactly ``dermamnist_<size>.npz`` / ``dermamnist.npz`` (28) when ``size`` is given — with
    ``{train,val,test}_images`` (uint8 ``[N, H, W, 3]``) and ``{train,val,test}_labels`` (``[N, 1]``).
    Image = the uint8 array; answer = the class name; ``meta``: ``label`` (index), ``label_name``.
    """
    return _medmnist("dermamnist", root, split, size, limit)


def load_organsmnist(root: PathLike, split: str = "train", size: int | None = None,
                     limit: int | None = None) -> list[Sample]:
    """OrganSMNIST (11 organs, sagittal CT) classification with Uni-Med's fixed question.

    Files as `load_dermamnist` (``organsmnist_224.npz`` / ``organsmnist.npz``), images uint8 ``[N, H, W]``.
    Answers use Uni-Med's wording of the official names (``"kidney-left"`` → ``"left kidney"``);
    ``meta["label_name"]`` keeps the official name.
    """
    return _medmnist("organsmnist", root, split, size, limit)
