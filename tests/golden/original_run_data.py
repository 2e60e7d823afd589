"""Tiny raw datasets for the original-run golden files: all twelve of Uni-Med's datasets, in the layouts the
original reads (and our `paper` config reads under one data root; docs/unimed.md, "Data: layouts").

`write_datasets(root)` writes, under `root`:

- ``MedQA/questions/US/{train,test}.jsonl``
- ``PubMedQA/{train_set,test_set}.json``
- ``Slake-VQA/{train,test}.txt`` + ``Slake-VQA/imgs/<folder>/{question.json,detection.json,source.jpg}``
  (the original's processed layout; VQA, REC ``ref_slake`` and REG ``invref_slake`` read it)
- ``Path-VQA/qas/{train,test}_vqa.pkl`` + ``Path-VQA/images/<split>/<img_id>.jpg``
- ``SA-Med2D-20M/{regions,images}_small_{train,test}/<modality>/<id>.{json,png}`` (REC ``ref_sa_med`` and REG
  ``invref_sa_med``); one modality folder and one region file per split, so the original's ``os.listdir`` order
  cannot differ between file systems
- ``MedPix/data_csv/MedPix_single_{train,test}.csv`` + images under ``MedPix/MedPix/images/``
- ``MIMIC_caption/annotation_small.json`` (what the original trains on) and ``MIMIC_caption/annotation.json``
  (R2Gen's format, what ``eval_caption.py`` reads: its ``test`` list) + images under
  ``MIMIC-CXR-JPG/2.0.0/files/...``
- ``MedMNIST/{dermamnist,organsmnist}_224.npz`` (MedMNIST v2 keys ``{train,val,test}_{images,labels}``)

Two or three entries per split, with text that exercises the original's text processor (``blip_caption_new``:
runs of 2+ whitespace characters collapsed to one space, ``rstrip("\\n")``, ``strip(" ")``, cut to 50 words split
on single spaces): double spaces, a single newline inside a sentence, leading/trailing spaces, upper case,
punctuation, a MedQA question and a SLAKE question of more than 50 words, a MIMIC report of more than 50 words;
entries the original filters out (a Chinese SLAKE question, an empty SLAKE answer, a MedPix "modality" row, a
MedPix row whose image is absent, a MIMIC study whose image is absent); boxes whose ``v / size * 100`` lies
within rounding of a whole number (e.g. 11.6 px of 40 -> 28.999999999999996 -> 28).

Images are deterministic (gradients plus seeded noise, sizes 40x30, 64x64, 100x100, ...). Every image file holds
PNG bytes, also where the layout names it ``.jpg`` (SLAKE's ``source.jpg``, Path-VQA, MIMIC): PIL opens files by
content, and PNG decodes to the same pixels in every Pillow version, where JPEG decoding may differ. MedMNIST
images are arrays in the ``.npz`` files (224x224, as the ``_224`` files hold).

Standard library, numpy and PIL only: both the scratch venv that runs the original
(tests/golden/make_original_run.py) and our own venv import this module.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------------------
# Text

LONG_MEDQA = (
    "A 67-year-old  man with a history of hypertension, type 2 diabetes mellitus and chronic kidney disease "
    "presents to the emergency department with sudden onset of crushing substernal chest pain radiating to the "
    "left arm, diaphoresis and nausea that began two hours ago while he was shoveling snow.\nHis blood pressure is "
    "150/90 mm Hg and pulse is 110/min. An ECG shows ST-segment elevations in leads II, III and aVF. "
    "Which of the following is the MOST appropriate next step in management?"
)
LONG_MEDQA_TEST = (
    "A 23-year-old pregnant woman at 22 weeks gestation presents with burning upon urination. She states it "
    "started 1 day ago and has been worsening despite drinking more water and taking cranberry extract. She "
    "otherwise feels well and is followed by a doctor for her pregnancy. Her temperature is 97.7 F (36.5 C), "
    "blood pressure is 122/77 mm Hg, pulse is 80/min. Which of the following is the best treatment for this patient?"
)
LONG_SLAKE_QUESTION = (
    "Looking carefully at this axial abdominal computed tomography slice taken after contrast injection, and "
    "taking into account the position of the spine, the kidneys, the liver, the spleen and the large vessels "
    "that run in front of the vertebral body, which organ shown on the left side of the image appears to be "
    "the  largest one in this slice?"
)
LONG_REPORT = (
    "FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  History of shortness of breath.\n\n "
    "FINDINGS:  The lungs are clear without focal consolidation, pleural effusion or pneumothorax. The "
    "cardiomediastinal silhouette is within normal limits.\nNo acute osseous abnormalities are seen. Mild "
    "degenerative changes of the thoracic spine. There is no free air below the diaphragm.\n\n IMPRESSION:  No "
    "acute cardiopulmonary process.  Heart size is normal. Followup chest radiograph is recommended in 6 weeks. "
)


def _medqa_row(question: str, answer: str, idx: str) -> dict:
    options = {"A": "Aspirin", "B": "Heparin", "C": "Nitrofurantoin", "D": "Liver", "E": answer}
    return {"question": question, "answer": answer, "options": options, "meta_info": "step1", "answer_idx": idx}


MEDQA = {
    "train": [
        _medqa_row("Which drug is BEST  for this patient?\nChoose one.", "Aspirin.", "A"),
        _medqa_row("  What is the most likely diagnosis?  ", "Mild  cardiomegaly", "E"),
        _medqa_row(LONG_MEDQA, "Percutaneous coronary intervention", "E"),
    ],
    "test": [
        _medqa_row(LONG_MEDQA_TEST, "Nitrofurantoin", "C"),
        _medqa_row("Which  organ is affected?\nExplain.", " Liver ", "D"),
    ],
}


def _pubmed_record(question: str, decision: str, long_answer: str) -> dict:
    return {"QUESTION": question, "CONTEXTS": ["Background context.", "Second  context."],
            "LABELS": ["BACKGROUND", "METHODS"], "MESHES": ["Humans"], "YEAR": "2010",
            "reasoning_required_pred": decision, "reasoning_free_pred": decision, "final_decision": decision,
            "LONG_ANSWER": long_answer}


PUBMEDQA = {
    "train_set": {
        "21645374": _pubmed_record("Do  mitochondria play a role in remodelling lace plant leaves during\n"
                                   "programmed cell death?", "yes", "Results depict mitochondrial dynamics."),
        "16418930": _pubmed_record(" Is the ANOVA test appropriate? ", "no", "It is not."),
        "9488747": _pubmed_record("Can tailored interventions increase mammography use among HMO women?", "maybe",
                                  "Perhaps."),
    },
    "test_set": {
        "12377809": _pubmed_record("Is anorectal endosonography valuable in dyschesia?", "yes", "Yes it is."),
        "26163474": _pubmed_record("Is  there a connection between sublingual varices and hypertension?\n", "maybe",
                                   "Maybe."),
    },
}

# ---------------------------------------------------------------------------------------------------------------
# Images


def _pixels(width: int, height: int, seed: int, gray: bool = False) -> np.ndarray:
    """A uint8 image: per-channel gradients at seed-dependent angles plus seeded noise."""
    rng = np.random.RandomState(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(1 if gray else 3):
        a, b = rng.uniform(-1.0, 1.0, size=2)
        base = 127.5 + 100.0 * np.sin(a * xs / max(width, 1) * 6.0 + b * ys / max(height, 1) * 6.0 + c)
        channels.append(base + rng.normal(0.0, 25.0, size=(height, width)))
    image = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
    return image[..., 0] if gray else image


def _png_bytes(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_pixels(width, height, seed), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(width, height, seed))


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# SLAKE (VQA + REC/REG), processed layout


def _slake_q(folder: str, qid: int, question: str, answer: str, lang: str = "en", kind: str = "OPEN") -> dict:
    return {"img_id": int(folder[5:]), "img_name": f"{folder}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Abdomen", "modality": "CT", "answer_type": kind, "base_type": "vqa",
            "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


# folder: (split, (width, height), seed, questions, detection)
SLAKE = {
    "xmlab1": ("train", (40, 30), 11, [
        _slake_q("xmlab1", 101, "Is the liver  healthy?", "Yes", kind="CLOSED"),
        _slake_q("xmlab1", 102, "肝脏健康吗?", "是", lang="zh", kind="CLOSED"),
        _slake_q("xmlab1", 103, "Which organ is empty?", "", kind="OPEN"),
        _slake_q("xmlab1", 104, LONG_SLAKE_QUESTION, "Liver", kind="OPEN"),
    ], [{"Liver": [11.6, 8.7, 12.4, 9.3]}, {"Heart": [0, 0, 40, 30]}]),
    "xmlab2": ("train", (64, 64), 12, [
        _slake_q("xmlab2", 201, "What modality is\nthis image?", "MRI", kind="OPEN"),
        _slake_q("xmlab2", 202, " Which organ is ABNORMAL? ", "Right  Lung", kind="OPEN"),
    ], [{"Right Lung": [16, 8, 32, 40]}, {"brain  stem": [63, 63, 1, 1]}]),
    "xmlab3": ("test", (100, 100), 13, [
        _slake_q("xmlab3", 301, "Is this a CT  image?", "No", kind="CLOSED"),
        _slake_q("xmlab3", 302, "这是CT吗?", "不是", lang="zh", kind="CLOSED"),
        _slake_q("xmlab3", 303, "Where is the abnormality?\n", " Left Lung ", kind="OPEN"),
    ], [{"Spleen": [29, 29, 41, 41]}, {"Left Kidney": [57, 14.000000000000002, 0.5, 99.5]}]),
    "xmlab4": ("test", (48, 36), 14, [
        _slake_q("xmlab4", 401, "Does the picture contain the HEART?", "Yes", kind="CLOSED"),
    ], [{"Large  Bowel": [4.8, 3.6, 24, 18]}]),
}


def _write_slake(root: Path) -> None:
    base = root / "Slake-VQA"
    for split in ("train", "test"):
        folders = [f for f, spec in SLAKE.items() if spec[0] == split]
        base.mkdir(parents=True, exist_ok=True)
        (base / f"{split}.txt").write_text("\n".join(folders) + "\n", encoding="utf-8")
    for folder, (_, (width, height), seed, questions, detection) in SLAKE.items():
        _write_image(base / "imgs" / folder / "source.jpg", width, height, seed)
        _write_json(base / "imgs" / folder / "question.json", questions)
        _write_json(base / "imgs" / folder / "detection.json", detection)


# ---------------------------------------------------------------------------------------------------------------
# Path-VQA (LXMERT-style pickles)

PATHVQA = {
    "train": [
        {"img_id": "train_0001", "label": {"yes": 1}, "question_id": 100001000, "question_type": "is",
         "sent": "Is this  a neoplasm?", "answer_type": "yes/no"},
        {"img_id": "train_0001", "label": {"in the canals of hering": 1}, "question_id": 100001001,
         "question_type": "where", "sent": "Where are liver stem cells\nlocated?", "answer_type": "other"},
        {"img_id": "train_0002", "label": {"Granulomatous  inflammation": 1}, "question_id": 100002000,
         "question_type": "what", "sent": "  WHAT does this image show?  ", "answer_type": "other"},
    ],
    "test": [
        {"img_id": "test_0001", "label": {"no": 1}, "question_id": 200001000, "question_type": "does",
         "sent": "Does this image show  a fibroma?", "answer_type": "yes/no"},
        {"img_id": "test_0002", "label": {"Hepatic  necrosis": 1}, "question_id": 200002000,
         "question_type": "what", "sent": "What is present?\n", "answer_type": "other"},
    ],
}
PATHVQA_IMAGES = {"train_0001": (64, 64, 21), "train_0002": (40, 30, 22), "test_0001": (56, 40, 23),
                  "test_0002": (32, 48, 24)}


def _write_pathvqa(root: Path) -> None:
    base = root / "Path-VQA"
    (base / "qas").mkdir(parents=True, exist_ok=True)
    for split, rows in PATHVQA.items():
        (base / "qas" / f"{split}_vqa.pkl").write_bytes(pickle.dumps(rows, protocol=4))
    for img_id, (width, height, seed) in PATHVQA_IMAGES.items():
        _write_image(base / "images" / img_id.split("_")[0] / f"{img_id}.jpg", width, height, seed)


# ---------------------------------------------------------------------------------------------------------------
# SA-Med2D-20M, processed layout

SAMED = {
    "train": ("ct_00", "ct_00--AbdomenCT1K--Case_00011--x_0041", (60, 45), 31, [
        {"liver": [17.4, 13.05, 30, 20]},
        {"left_kidney": [0, 0, 60, 45]},
        {"brain_tumor  core": [6, 4.5, 0.6, 0.45]},
    ]),
    "test": ("mr_t1", "mr_t1--BraTS2021--Case_00002--z_0070", (50, 50), 32, [
        {"spleen": [14.5, 14.5, 20.5, 20.5]},
        {"Right  kidney": [49, 0, 1, 50]},
    ]),
}


def _write_samed(root: Path) -> None:
    base = root / "SA-Med2D-20M"
    for split, (modality, image_id, (width, height), seed, regions) in SAMED.items():
        _write_json(base / f"regions_small_{split}" / modality / f"{image_id}.json", regions)
        _write_image(base / f"images_small_{split}" / modality / f"{image_id}.png", width, height, seed)


# ---------------------------------------------------------------------------------------------------------------
# MedPix (RadFM's CSVs)

MEDPIX = {
    "train": [
        ("MPX1009_synpic46283.png", "Axial CT:  liver\nmass.", "caption", (64, 48, 41)),
        ("MPX1009_synpic46283.png", "CT - noncontrast", "modality", None),
        ("MPX1016_synpic20253.png", "  Chest X-ray:  consolidation.  ", "caption", (48, 64, 42)),
        ("MPX1017_synpic20254.png", "Coronal MRI of the knee shows a torn  medial meniscus.", "caption",
         (40, 30, 46)),
        ("MPX9999_synpic00000.png", "The image of this row is absent.", "caption", None),
        ("MPX1020_synpic12345.png", "", "caption", (32, 32, 43)),
    ],
    "test": [
        ("MPX2001_synpic30001.png", "MRI BRAIN:  T2 hyperintense lesion in the left frontal lobe.", "caption",
         (40, 40, 44)),
        ("MPX2002_synpic30002.png", "Sagittal  image of the lumbar spine.\n", "caption", (36, 60, 45)),
    ],
}


def _write_medpix(root: Path) -> None:
    base = root / "MedPix"
    (base / "data_csv").mkdir(parents=True, exist_ok=True)
    for split, rows in MEDPIX.items():
        with (base / "data_csv" / f"MedPix_single_{split}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["", "name", "context", "type"])
            for index, (name, context, kind, image) in enumerate(rows):
                writer.writerow([index, name, context, kind])
                if image is not None:
                    _write_image(base / "MedPix" / "images" / name, *image)


# ---------------------------------------------------------------------------------------------------------------
# MIMIC-CXR (R2Gen annotation)


def _mimic_row(study: str, subject: str, report: str, paths: list[str], split: str) -> dict:
    return {"id": paths[0].split("/")[-1][:-4], "study_id": int(study), "subject_id": int(subject),
            "report": report, "image_path": paths, "split": split}


MIMIC_TRAIN = [
    _mimic_row("50414267", "10000032", "Lungs clear.\nNo  effusion.",
               ["p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
                "p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg"], "train"),
    _mimic_row("53189527", "10000032", "  Mild cardiomegaly. NO  edema.  ",
               ["p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"], "train"),
    _mimic_row("53911762", "10000764", LONG_REPORT,
               ["p10/p10000764/s53911762/68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714.jpg"], "train"),
    _mimic_row("57375967", "10000898", "Image absent on disk.",
               ["p10/p10000898/s57375967/00000000-absent00-absent00-absent00-absent000.jpg"], "train"),
]
MIMIC_TEST = [
    _mimic_row("50051329", "10001884", LONG_REPORT.replace("shortness of breath", "cough"),
               ["p10/p10001884/s50051329/4b8a3a5c-5c3f2b5a-04e2a1b4-66d7e4a8-0e1b6e0c.jpg"], "test"),
    _mimic_row("50771383", "10002013", "Heart size is  normal.\nThe lungs are clear.",
               ["p10/p10002013/s50771383/2f5f7a6e-0d3c6b44-8b7c4a77-5e7d1c7b-7e3f1a2b.jpg"], "test"),
]
MIMIC_IMAGE_SIZES = [(64, 64), (40, 30), (48, 48), None, (64, 56), (30, 40)]


def _write_mimic(root: Path) -> None:
    rows = MIMIC_TRAIN + MIMIC_TEST
    for index, (row, size) in enumerate(zip(rows, MIMIC_IMAGE_SIZES)):
        if size is not None:
            _write_image(root / "MIMIC-CXR-JPG" / "2.0.0" / "files" / row["image_path"][0], *size, 50 + index)
    _write_json(root / "MIMIC_caption" / "annotation.json", {"train": MIMIC_TRAIN, "val": [], "test": MIMIC_TEST})
    _write_json(root / "MIMIC_caption" / "annotation_small.json",
                {"train": MIMIC_TRAIN, "val": [], "test": MIMIC_TEST})


# ---------------------------------------------------------------------------------------------------------------
# MedMNIST v2 (the 224x224 files)

# flag: (gray, {split: labels})
MEDMNIST = {
    "dermamnist": (False, {"train": [5, 0], "val": [4], "test": [6, 1]}),
    "organsmnist": (True, {"train": [1, 10, 4], "val": [3], "test": [2, 7]}),
}


def _write_medmnist(root: Path) -> None:
    base = root / "MedMNIST"
    base.mkdir(parents=True, exist_ok=True)
    for f_index, (flag, (gray, splits)) in enumerate(MEDMNIST.items()):
        arrays = {}
        for s_index, (split, labels) in enumerate(splits.items()):
            images = [_pixels(224, 224, 600 + 100 * f_index + 10 * s_index + i, gray=gray) for i in range(len(labels))]
            arrays[f"{split}_images"] = np.stack(images)
            arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8).reshape(-1, 1)
        np.savez(base / f"{flag}_224.npz", **arrays)


# ---------------------------------------------------------------------------------------------------------------


def _write_medqa(root: Path) -> None:
    base = root / "MedQA" / "questions" / "US"
    base.mkdir(parents=True, exist_ok=True)
    for split, rows in MEDQA.items():
        (base / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _write_pubmedqa(root: Path) -> None:
    for name, data in PUBMEDQA.items():
        _write_json(root / "PubMedQA" / f"{name}.json", data)


def write_datasets(root: Path) -> None:
    """Write all twelve tiny datasets under `root` (created if absent)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_medqa(root)
    _write_pubmedqa(root)
    _write_slake(root)
    _write_pathvqa(root)
    _write_samed(root)
    _write_medpix(root)
    _write_mimic(root)
    _write_medmnist(root)


if __name__ == "__main__":
    import sys

    write_datasets(Path(sys.argv[1]))
