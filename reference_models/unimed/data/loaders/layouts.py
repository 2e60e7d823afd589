"""The folder layout each loader expects, as one line of text: quoted by every data error and by `LOADERS`."""

from __future__ import annotations

_SLAKE = ("the SLAKE 1.0 release: <root>/{train,validate,test}.json (lists of {img_name, question, answer, "
          "q_lang, answer_type}) and <root>/imgs/xmlab<N>/{source.jpg,detection.json}")
_SAMED2D = ("the SA-Med2D-20M SAMed2Dv1 folder: <root>/SAMed2D_v1.json {\"images/<stem>.png\": "
            "[\"masks/<stem>--<class id>_<instance>.png\", ...]}, <root>/SAMed2D_v1_class_mapping_id.json "
            "{dataset: {class name: class id}}, <root>/images/, <root>/masks/")
_MEDMNIST = ("the MedMNIST v2 file <root>/{flag}_224.npz (or {flag}.npz, {flag}_<size>.npz) with "
             "{{train,val,test}}_images and {{train,val,test}}_labels")

LAYOUTS: dict[str, str] = {
    "medqa": ("the MedQA release: <root>/questions/US/{train,dev,test}.jsonl, one {question, answer, options, "
              "answer_idx} object per line"),
    "pubmedqa": ("PubMedQA PQA-L: <root>/ori_pqal.json {pmid: {QUESTION, final_decision, ...}} with "
                 "<root>/test_ground_truth.json {pmid: answer}, or the official split script's "
                 "<root>/pqal_fold<k>/{train,dev}_set.json and <root>/test_set.json"),
    "slake_vqa": _SLAKE,
    "slake_rec": _SLAKE,
    "slake_reg": _SLAKE,
    "pathvqa": ("the Path-VQA release: <root>/qas/{train,val,test}_vqa.pkl (or <root>/qas/<split>/<split>_qa.pkl) "
                "and <root>/images/<split>/<img_id>.jpg"),
    "mimic_cxr": ("R2Gen-style MIMIC-CXR captions: <root>/annotation.json {train,val,test: [{image_path: "
                  "[relative path, ...], report}]} and images at <image_root, default root>/files/<relative path>"),
    "medpix": ("RadFM's MedPix single-image captions: <root>/MedPix_single_{train,test}.csv (columns name, context, "
               "type) and images at <image_root, default root/images>/<name>"),
    "samed2d_rec": _SAMED2D,
    "samed2d_reg": _SAMED2D,
    "dermamnist": _MEDMNIST.format(flag="dermamnist"),
    "organsmnist": _MEDMNIST.format(flag="organsmnist"),
}
