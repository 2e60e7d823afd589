"""The instructions a sample is trained and asked with: the original's pools of templates and how one is drawn.

The original Uni-Med (tsinghua-msiip/Uni-Med @63b9dfb, ``uni_med/datasets/datasets/*.py``) keeps an
``instruction_pool`` per dataset and takes ``random.choice`` of it each time a training entry is read; its eval
scripts ask with one fixed instruction per dataset. `POOLS` transcribes those pools (by our loader names) and
`draw_template` draws from them the same way — uniformly, afresh at every read — but keyed by (seed, global batch,
position) instead of a worker's RNG, so a run is reproducible from its seed and a resumed run draws exactly what
the uninterrupted one would have, whatever the number of processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cmoe.reference_models.unimed.tasks import TASKS

_VQA = ("[vqa] {}", "[vqa] Based on the image, respond to this question with a short answer: {}")
_REFER = ("[refer] {}", "[refer] give me the location of {}", "[refer] where is {} ?",
          "[refer] from this image, tell me the location of {}", "[refer] the location of {} is",
          "[refer] could you tell me the location for {} ?", "[refer] where can I locate the {} ?")
_IDENTIFY = ("[identify] {}", "[identify] what object is in this location {}",
             "[identify] identify the object present at this location {}", "[identify] what is it in {}",
             "[identify] describe this object in {}", "[identify] this {} is", "[identify] the object in {} is")
_MIMIC = ("Describe the given chest x-ray image in detail.",
          "Take a look at this chest x-ray and describe the findings and impression.",
          "Could you provide a detailed description of the given x-ray image?",
          "Describe the given chest x-ray image as detailed as possible.",
          "What are the key findings in this chest x-ray image?")
_MEDPIX = ("Describe this input image.", "Help captioning the image.", "What can be inflected from the scan?",
           "Can you give a caption for this image?", "Can you provide a brief summary of the radiology image?",
           "Please write a report about the image?", "Can you provide an analysis of this image?",
           "Can you explain what is shown in this image?", "What can be indicated from the radiologic scans?",
           "What can you infer from this photograph?")
_MEDQA = ("[qa] {}", "[qa] If you are a doctor, please answer the following question briefly: {}")
_PUBMEDQA = ("[qa] {}", "[qa] If you are a doctor, please answer the following question using 'yes', 'no' or "
             "'maybe': {}")


@dataclass(frozen=True)
class Pool:
    """A dataset's templates: ``{}`` takes the sample's `field` (None: the template is the whole instruction after
    `prefix`, as the report pools are)."""

    templates: tuple[str, ...]
    field: str | None
    prefix: str = ""

    def instruction(self, index: int, fields: dict[str, str]) -> str:
        template = self.prefix + self.templates[index]
        return template.format(fields[self.field]) if self.field is not None else template


POOLS: dict[str, Pool] = {
    "slake_vqa": Pool(_VQA, "question"), "pathvqa": Pool(_VQA, "question"),
    "slake_rec": Pool(_REFER, "object"), "samed2d_rec": Pool(_REFER, "object"),
    "slake_reg": Pool(_IDENTIFY, "box"), "samed2d_reg": Pool(_IDENTIFY, "box"),
    "mimic_cxr": Pool(_MIMIC, None, "[caption] "), "medpix": Pool(_MEDPIX, None, "[caption] "),
    "medqa": Pool(_MEDQA, "question"), "pubmedqa": Pool(_PUBMEDQA, "question"),
}
"""The original's training pools by loader name (MedMNIST has none: always ``[cls] <its question>``)."""

TASK_POOLS: dict[str, Pool] = {"vqa": POOLS["slake_vqa"], "rec": POOLS["slake_rec"], "reg": POOLS["slake_reg"],
                               "qa": POOLS["medqa"]}
"""Pools for a source the original does not have (e.g. the synthetic set), by task; reports and classification
of such sources keep their own question."""

PUBMEDQA_EVAL = _PUBMEDQA[1]
"""PubMedQA's own instruction (the original evaluates no text QA; ``pubmedqa_instruction: own`` asks with this)."""


def pool_of(source: str, task: str) -> Pool | None:
    """The pool a training sample of `source` (a loader name) and `task` draws its instruction from, if any."""
    return POOLS.get(source) or TASK_POOLS.get(task)


def draw_template(seed: int, batch: int, position: int, size: int) -> int:
    """A uniform draw from ``range(size)`` for the sample at `position` of global batch `batch` of a run seeded
    `seed`: the same numbers give the same draw in any process, so a resumed run repeats the uninterrupted one."""
    return int(np.random.default_rng([seed, batch, position]).integers(size))


def fixed_instruction(task: str, fields: dict[str, str], source: str = "", pubmedqa_own: bool = False) -> str:
    """The one instruction a sample is asked with at evaluation (the original's eval scripts' choice; our
    training default too): the task's template, or PubMedQA's own when `pubmedqa_own`."""
    if pubmedqa_own and source == "pubmedqa":
        return PUBMEDQA_EVAL.format(fields["question"])
    return TASKS[task].instruction(**fields)


class DrawnInstructions:
    """Training samples read by key ``(index, batch, position)`` (a map-style dataset for a DataLoader whose batch
    sampler yields such keys): with `draw`, each read of a sample with a pool gets a fresh template index in
    ``meta["template"]`` (`draw_template`); without, samples are returned unchanged."""

    def __init__(self, samples: list, seed: int, draw: bool):
        self.samples, self.seed, self.draw = samples, seed, draw

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int, int]):
        index, batch, position = key
        sample = self.samples[index]
        pool = pool_of(sample.source, sample.task) if self.draw else None
        if pool is None:
            return sample
        template = draw_template(self.seed, batch, position, len(pool.templates))
        return dataclasses.replace(sample, meta={**sample.meta, "template": template})


def keyed_batches(batches, first: int, stride: int):
    """Index lists → lists of ``(index, global batch, position)`` keys, batch numbers counted from `first` in
    steps of `stride` (this rank's share of the shared stream)."""
    for number, indices in enumerate(batches):
        batch = first + number * stride
        yield [(index, batch, position) for position, index in enumerate(indices)]
