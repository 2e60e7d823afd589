"""MedMNIST v2 class names and Uni-Med's fixed classification questions for DermaMNIST and OrganSMNIST.

`OFFICIAL_LABELS` copies the ``label`` entries of ``medmnist.INFO`` (index → name). Uni-Med rewrites the
organ names ``"femur-left"`` → ``"left femur"`` before using them as answers, and asks one fixed question per
dataset listing every class in that rewritten form (`QUESTIONS`, verbatim from its ``medmnist_dataset.py``).
"""

from __future__ import annotations

OFFICIAL_LABELS: dict[str, tuple[str, ...]] = {
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "organsmnist": (
        "bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
        "lung-left", "lung-right", "pancreas", "spleen",
    ),
}

QUESTIONS: dict[str, str] = {
    "dermamnist": ("Which category does this multi-source dermatoscopic image of common pigmented skin lesions "
                   "belong to: actinic keratoses and intraepithelial carcinoma, basal cell carcinoma, benign "
                   "keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevi, or vascular lesions?"),
    "organsmnist": ("Which category does this CT image belong to: bladder, left femur, right femur, heart, left "
                    "kidney, right kidney, liver, left lung, right lung, pancreas, or spleen?"),
}


def answer_name(label_name: str) -> str:
    """Uni-Med's answer for an official label name: ``"kidney-left"`` → ``"left kidney"``, others unchanged."""
    for side in ("left", "right"):
        suffix = f"-{side}"
        if label_name.endswith(suffix):
            return f"{side} {label_name[:-len(suffix)]}"
    return label_name


def class_names(flag: str) -> tuple[str, ...]:
    """The answers Uni-Med trains on for `flag` (``dermamnist`` or ``organsmnist``), in label order."""
    return tuple(answer_name(name) for name in OFFICIAL_LABELS[flag])
