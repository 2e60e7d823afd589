"""A built-in synthetic, medical-like multi-task set: Uni-Med's six tasks with nothing to download.

Why: the demo, the tests and the CMoE-vs-MLP experiment must run offline on 2 CPU cores in minutes, with a
tiny vision encoder (32–64 px) and a tiny word-level LLM. Generation is deterministic from a seed, fast
(thousands of entries per second) and uses a small closed vocabulary (`VOCABULARY`, with `split_words` as
the word rule) so a word-level tokenizer covers every prompt and answer.

Images. Each ``[H, W]`` uint8 "scan" has an imaging **modality** (x-ray, ct, mri, ultrasound), which only sets
a global texture over the whole image (horizontal stripes, vertical stripes, rings, speckle; ±10 grey
levels), and a **body region** (chest, brain, abdomen, pelvis), which sets the organ set. One to
`max_organs` organs of the region are drawn as ellipses at random positions and sizes, their boxes kept one
pixel apart; each organ has a fixed grey level (`ORGAN_LEVELS`, ≥ 30 apart within a region, background 40).
With probability `lesion_probability` one organ holds a lesion: a small or large disk, bright (250) or
dark (15), wholly inside the organ (covering at most half of it) and inside one image quadrant (when no such
spot exists the image stays normal). All intensity bands are disjoint, so ground truth can be read back
from the pixels (the tests do).

Tasks, each needing different visual information (so that a small shared connector feels the tug-of-war):

- ``cls``: the modality, answerable from the global texture alone (organs and region carry no information);
  the question lists the four classes; meta ``label`` (index in `MODALITIES`) and ``classes``.
- ``rec`` / ``reg``: organ name → box text (`encode_box`), and box text → organ name: positions and extents,
  plus organ identity from grey level within the region; meta ``box`` (`Box`), ``xywh`` (the pixel box) and
  ``image_size``.
- ``vqa``: alternately closed (yes/no: lesion in an organ, abnormal image, organ shown, lesion large or
  bright) and open questions (brightest/darkest organ, organ count, body region, lesion quadrant, organ,
  size, brightness), mostly about lesion details; meta ``answer_type`` and ``question_type``.
- ``report``: two templated sentences (modality, region, organs; lesion size, brightness, quadrant and
  organ, or "no lesion is seen."), to the instruction "Describe this input image.".
- ``qa``: text only, from the fixed knowledge table `QA_FACTS`; no image.

Annotation density (IMAX vs DMAX, arXiv 2504.09967). ``annotation="dense"`` (IMAX-like): each of the
`num_images` images carries every image task in `tasks` — 1 cls, `vqa_per_image` vqa, 1 report and one rec
and one reg per organ. ``annotation="sparse"`` (DMAX-like): the *per-task entry counts are exactly those of
the dense set with the same config* (its organ counts are drawn from the same seed), but spread over fresh
images, each serving one task group as a real source would: ``cls`` (MedMNIST-like), ``vqa`` (SLAKE-like),
``report`` (MIMIC-like) or ``rec`` + ``reg`` together (SA-Med2D-like); the last rec/reg image is cut short
to hit the count exactly. So sparse spends about one image per group per dense image (4× with all five image
tasks) for the same entries. QA entries are the same in both.

Every image draws from its own generator seeded by ``(seed, stream, index)``, so an image does not depend on
the task subset; dense, sparse and test images use separate streams (ids ``synthetic/<i>``,
``synthetic/sparse/<i>``, ``synthetic/test/<i>``). An image's entries share one array object.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from cmoe.errors import expect
from cmoe.reference_models.unimed.boxes import encode_box, parse_box
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.prompts import build_prompt
from cmoe.reference_models.unimed.tasks import TASKS

MODALITIES: tuple[str, ...] = ("x-ray", "ct", "mri", "ultrasound")
"""The classification classes, in label order."""

REGIONS: dict[str, tuple[str, ...]] = {
    "chest": ("lung", "heart", "aorta"),
    "brain": ("brain", "eye", "cerebellum"),
    "abdomen": ("liver", "kidney", "spleen"),
    "pelvis": ("bladder", "rectum", "femur"),
}
"""Body regions and the organs that can appear in them (names unique within a region)."""

ORGAN_LEVELS: dict[str, int] = {
    "lung": 100, "heart": 160, "aorta": 220,
    "brain": 130, "eye": 190, "cerebellum": 100,
    "liver": 140, "kidney": 200, "spleen": 110,
    "bladder": 90, "rectum": 150, "femur": 230,
}
"""Grey level of each organ before texture (organ pixels lie within ``level ± TEXTURE_AMPLITUDE``)."""

BACKGROUND_LEVEL = 40
TEXTURE_AMPLITUDE = 10
LESION_LEVELS: dict[str, int] = {"bright": 250, "dark": 15}
LESION_RADII: dict[str, float] = {"small": 0.04, "large": 0.07}
"""Lesion disk radius as a fraction of the image size."""

QUADRANTS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")
IMAGE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.has_image)
SPARSE_GROUPS: tuple[tuple[str, ...], ...] = (("cls",), ("vqa",), ("report",), ("rec", "reg"))
"""The task groups a sparse (DMAX-like) image serves: one group per image."""

QA_FACTS: tuple[tuple[str, str], ...] = (
    ("which organ filters blood to make urine?", "kidney"),
    ("which organ pumps blood through the body?", "heart"),
    ("which organ takes oxygen from the air into the blood?", "lung"),
    ("which organ makes bile?", "liver"),
    ("which organ stores urine?", "bladder"),
    ("which organ removes old red blood cells?", "spleen"),
    ("which part of the brain controls balance?", "cerebellum"),
    ("which organ is used to see?", "eye"),
    ("which is the largest artery of the body?", "aorta"),
    ("which is the longest bone of the body?", "femur"),
    ("which organ stores stool before it leaves the body?", "rectum"),
    ("which organ controls thought and memory?", "brain"),
    ("which imaging method uses sound waves?", "ultrasound"),
    ("which imaging method uses a strong magnet?", "mri"),
    ("which imaging method builds slices from many x-ray images?", "ct"),
    ("is the heart a muscle?", "yes"),
    ("does the liver make urine?", "no"),
    ("can the liver grow back after part of it is removed?", "yes"),
    ("is the femur in the chest?", "no"),
    ("does a healthy person have two kidneys?", "yes"),
    ("is the aorta a vein?", "no"),
    ("does an mri use x-rays?", "no"),
    ("is the bladder in the pelvis?", "yes"),
    ("is the spleen in the abdomen?", "yes"),
)
"""The text-only QA knowledge table: (question, answer)."""

CLS_QUESTION = f"which imaging modality is used for this image? choose from {', '.join(MODALITIES)}."
REPORT_QUESTION = "Describe this input image."

_VQA_CLOSED: dict[str, str] = {
    "lesion_in_organ": "is there a lesion in the {organ}?",
    "abnormal": "is this image abnormal?",
    "organ_shown": "is the {organ} shown in this image?",
    "lesion_large": "is the lesion large?",
    "lesion_bright": "is the lesion bright?",
}
_VQA_OPEN: dict[str, str] = {
    "brightest": "which organ is the brightest?",
    "darkest": "which organ is the darkest?",
    "count": "how many organs are shown?",
    "region": "which part of the body is shown?",
    "lesion_where": "where is the lesion?",
    "lesion_organ": "which organ has the lesion?",
    "lesion_size": "how large is the lesion?",
    "lesion_kind": "is the lesion bright or dark?",
}
_LESION_KINDS = frozenset({"lesion_large", "lesion_bright", "lesion_where", "lesion_organ", "lesion_size",
                           "lesion_kind"})
_REPORT_FINDINGS = "{modality} of the {region} showing the {organs}."
_REPORT_LESION = "a {size} {kind} lesion is seen in the {quadrant} of the {organ}."
_REPORT_NORMAL = "no lesion is seen."

Entry = tuple[dict[str, str], str, dict]
"""One entry before it becomes a `Sample`: instruction fields, answer, meta."""

_STREAMS = {"dense": 0, "sparse": 1, "test": 2, "qa": 3}
_ID_PREFIX = {"dense": "synthetic/", "sparse": "synthetic/sparse/", "test": "synthetic/test/"}


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate: image budget, image size, seed, annotation density, tasks and per-task amounts.

    `num_images` is the dense image budget (sparse mode matches its per-task entry counts with more images);
    `qa_questions` is the number of text-only QA entries; `vqa_per_image` VQA entries per annotated image.
    """

    num_images: int = 200
    image_size: int = 32
    seed: int = 0
    annotation: str = "dense"
    tasks: tuple[str, ...] = tuple(TASKS)
    qa_questions: int = 100
    vqa_per_image: int = 2
    max_organs: int = 3
    lesion_probability: float = 0.5
    texture_amplitude: int = TEXTURE_AMPLITUDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks) if not isinstance(self.tasks, str) else self.tasks)
        expect(_is_int(self.num_images) and self.num_images >= 0, "num_images", "an int >= 0", self.num_images)
        expect(_is_int(self.image_size) and 16 <= self.image_size <= 1024, "image_size", "an int in 16..1024",
               self.image_size)
        expect(_is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0", self.seed)
        expect(self.annotation in ("dense", "sparse"), "annotation", "'dense' or 'sparse'", repr(self.annotation))
        expect(_is_int(self.texture_amplitude) and 0 <= self.texture_amplitude <= 60, "texture_amplitude",
               "an int in 0..60", self.texture_amplitude)
        expect(isinstance(self.tasks, tuple) and len(self.tasks) > 0 and set(self.tasks) <= set(TASKS)
               and len(set(self.tasks)) == len(self.tasks), "tasks",
               f"a non-empty sequence of distinct task names from {list(TASKS)}", self.tasks)
        expect(_is_int(self.vqa_per_image) and 1 <= self.vqa_per_image <= 8, "vqa_per_image", "an int in 1..8",
               self.vqa_per_image)
        expect(_is_int(self.max_organs) and 1 <= self.max_organs <= 3, "max_organs", "an int in 1..3",
               self.max_organs)
        expect(isinstance(self.lesion_probability, (int, float)) and 0.0 <= self.lesion_probability <= 1.0,
               "lesion_probability", "a number in [0, 1]", self.lesion_probability)
        expect(_is_int(self.qa_questions) and self.qa_questions >= ("qa" in self.tasks), "qa_questions",
               "an int >= 1 when 'qa' is among the tasks (>= 0 otherwise)", self.qa_questions)
        expect(self.num_images >= 1 or not self.image_tasks, "num_images",
               f"at least 1 image for the image tasks {list(self.image_tasks)}", self.num_images)

    @property
    def image_tasks(self) -> tuple[str, ...]:
        """The requested tasks that take an image, in `TASKS` order."""
        return tuple(t for t in IMAGE_TASKS if t in self.tasks)


@dataclass(frozen=True)
class PlacedOrgan:
    """An organ drawn in an image: its name, grey level and tight pixel box ``(x, y, w, h)``."""

    name: str
    level: int
    xywh: tuple[int, int, int, int]


@dataclass(frozen=True)
class Lesion:
    """The lesion's organ, size (small/large), kind (bright/dark) and image quadrant."""

    organ: str
    size: str
    kind: str
    quadrant: str


@dataclass(frozen=True)
class Scene:
    """One synthetic image and its ground truth, from which every task's entries are written."""

    modality: str
    region: str
    organs: tuple[PlacedOrgan, ...]
    lesion: Lesion | None
    image: np.ndarray


def split_words(text: str) -> list[str]:
    """The word rule of the vocabulary: lower-cased runs of letters, runs of digits, single other characters."""
    return _WORD.findall(text.lower())


def vocabulary(samples: Iterable[Sample] | None = None) -> list[str]:
    """Sorted words (see `split_words`) of the samples' instructions and answers; all of `VOCABULARY` if None."""
    if samples is None:
        return list(VOCABULARY)
    words: set[str] = set()
    for sample in samples:
        words.update(split_words(TASKS[sample.task].instruction(**sample.fields)))
        words.update(split_words(sample.answer))
    return sorted(words)


def make_scene(config: SyntheticConfig, index: int, stream: str = "dense") -> Scene:
    """Image `index` of a stream (``dense``, ``sparse`` or ``test``), rendered with its ground truth."""
    expect(stream in _ID_PREFIX, "stream", f"one of {list(_ID_PREFIX)}", repr(stream))
    expect(_is_int(index) and index >= 0, "index", "an int >= 0", index)
    return _render(_image_rng(config.seed, stream, index), config)


def generate(config: SyntheticConfig | None = None) -> list[Sample]:
    """The synthetic set for `config`: image entries grouped by image (tasks in `TASKS` order), then QA."""
    config = config or SyntheticConfig()
    expect(isinstance(config, SyntheticConfig), "config", "a SyntheticConfig", type(config).__name__)
    if config.annotation == "dense":
        samples = _dense(config, "dense", config.num_images)
    else:
        samples = _sparse(config)
    return samples + _qa_entries(config, config.qa_questions, stream_offset=0)


def generate_splits(config: SyntheticConfig | None = None, eval_fraction: float = 0.2,
                    eval_images: int | None = None) -> dict[str, list[Sample]]:
    """``{"train", "test"}`` with disjoint images: `eval_images` (or `eval_fraction` of `num_images`) go to test.

    The test split is always densely annotated from its own image stream, so dense and sparse training sets
    made from one config are evaluated on the very same test entries. Train gets the remaining image budget
    with the config's annotation. Test QA (about the same fraction of `qa_questions`) asks the same facts as
    train, as closed-book medical QA does.
    """
    config = config or SyntheticConfig()
    expect(isinstance(config, SyntheticConfig), "config", "a SyntheticConfig", type(config).__name__)
    if eval_images is None:
        expect(isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0, "eval_fraction",
               "a number strictly between 0 and 1", eval_fraction)
        eval_images = max(1, round(config.num_images * eval_fraction))
    expect(_is_int(eval_images) and 1 <= eval_images < config.num_images, "eval_images",
           f"an int in 1..{config.num_images - 1} (num_images is {config.num_images})", eval_images)
    train = generate(replace(config, num_images=config.num_images - eval_images))
    test_qa = max(1, round(config.qa_questions * eval_images / config.num_images)) if "qa" in config.tasks else 0
    test = _dense(config, "test", eval_images) + _qa_entries(config, test_qa, stream_offset=1)
    return {"train": train, "test": test}


# --- scenes ----------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _image_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng((seed, _STREAMS[stream], index))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a row ``[1, S]`` (x) and a column ``[S, 1]`` (y)."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return centres[None, :], centres[:, None]


def _plan(rng: np.random.Generator, config: SyntheticConfig) -> tuple[str, str, list[str]]:
    """Modality, region and the organs to draw: the first draws of an image (cheap, for budget counting)."""
    modality = MODALITIES[rng.integers(len(MODALITIES))]
    region = list(REGIONS)[rng.integers(len(REGIONS))]
    count = int(rng.integers(1, config.max_organs + 1))
    names = [REGIONS[region][i] for i in sorted(rng.choice(len(REGIONS[region]), size=count, replace=False))]
    return modality, region, names


def _render(rng: np.random.Generator, config: SyntheticConfig) -> Scene:
    modality, region, names = _plan(rng, config)
    size = config.image_size
    ellipses = _place_ellipses(rng, len(names), size)
    texture = _texture(rng, modality, size, config.texture_amplitude)
    pixels = BACKGROUND_LEVEL + texture
    organs, masks = [], []
    for name, (cx, cy, a, b) in zip(names, ellipses):
        mask = _ellipse_mask(size, cx, cy, a, b)
        pixels[mask] = ORGAN_LEVELS[name] + texture[mask]
        organs.append(PlacedOrgan(name, ORGAN_LEVELS[name], _tight_box(mask)))
        masks.append(mask)
    lesion = None
    if rng.random() < config.lesion_probability:
        lesion = _add_lesion(rng, pixels, names, ellipses, masks, size)
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return Scene(modality, region, tuple(organs), lesion, image)


def _place_ellipses(rng: np.random.Generator, count: int, size: int) -> list[tuple[float, float, float, float]]:
    """``count`` ellipses ``(cx, cy, a, b)`` inside the image whose boxes stay a pixel apart (shrinking on retry)."""
    for attempt in range(1000):
        scale = 0.97 ** attempt
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(count):
            a, b = np.maximum(rng.uniform(0.11, 0.2, 2) * size * scale, 1.0)
            cx, cy = rng.uniform(a + 1, size - a - 1), rng.uniform(b + 1, size - b - 1)
            if any(abs(cx - ox) < a + oa + 1 and abs(cy - oy) < b + ob + 1 for ox, oy, oa, ob in placed):
                break
            placed.append((float(cx), float(cy), float(a), float(b)))
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} organs in a {size}x{size} image")


def _ellipse_mask(size: int, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    xs, ys = _grid(size)
    return ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1.0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def _texture(rng: np.random.Generator, modality: str, size: int, amplitude: int = TEXTURE_AMPLITUDE) -> np.ndarray:
    """The modality's global texture in ``[-amplitude, amplitude]``: the only cue for ``cls``. The default keeps
    organ grey-level ranges apart; a larger one makes the modality easier to see for weak (random) encoders."""
    xs, ys = _grid(size)
    period, phase = size * rng.uniform(0.12, 0.18), rng.uniform(0, 2 * math.pi)
    if modality == "x-ray":
        wave = np.broadcast_to(np.sin(2 * math.pi * ys / period + phase), (size, size))
    elif modality == "ct":
        wave = np.broadcast_to(np.sin(2 * math.pi * xs / period + phase), (size, size))
    elif modality == "mri":
        cx, cy = size * rng.uniform(0.3, 0.7, 2)
        wave = np.sin(2 * math.pi * np.hypot(xs - cx, ys - cy) / period + phase)
    else:
        wave = rng.uniform(-1.0, 1.0, (size, size))
    return (amplitude * wave).astype(np.float32)


def _add_lesion(rng: np.random.Generator, pixels: np.ndarray, names: list[str],
                ellipses: list[tuple[float, float, float, float]], masks: list[np.ndarray],
                size: int) -> Lesion | None:
    """Paint a disk wholly inside one organ (covering at most half of it) and one image quadrant; None if no
    such spot was found."""
    which = int(rng.integers(len(names)))
    lesion_size = ("small", "large")[int(rng.integers(2))]
    kind = ("bright", "dark")[int(rng.integers(2))]
    cx, cy, a, b = ellipses[which]
    radius = LESION_RADII[lesion_size] * size
    xs, ys = _grid(size)
    for _ in range(30):
        angle, reach = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform())
        lx = cx + reach * max(a - radius, 0.5) * math.cos(angle)
        ly = cy + reach * max(b - radius, 0.5) * math.sin(angle)
        disk = (xs - lx) ** 2 + (ys - ly) ** 2 <= radius * radius
        quadrant = _quadrant(disk, size)
        inside = disk.any() and not (disk & ~masks[which]).any() and 2 * disk.sum() <= masks[which].sum()
        if inside and quadrant is not None:
            pixels[disk] = LESION_LEVELS[kind]
            return Lesion(names[which], lesion_size, kind, quadrant)
    return None


def _quadrant(mask: np.ndarray, size: int) -> str | None:
    """The quadrant holding every pixel of `mask` (pixel centres strictly off the midlines), else None."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    half = size / 2
    left, right = cols.max() + 0.5 < half, cols.min() + 0.5 > half
    upper, lower = rows.max() + 0.5 < half, rows.min() + 0.5 > half
    if not (left or right) or not (upper or lower):
        return None
    return f"{'upper' if upper else 'lower'} {'left' if left else 'right'}"


# --- entries ---------------------------------------------------------------------------------------------


def _dense(config: SyntheticConfig, stream: str, num_images: int) -> list[Sample]:
    """Every image task of `config` on each of `num_images` images of `stream`."""
    samples: list[Sample] = []
    for index in range(num_images if config.image_tasks else 0):
        rng = _image_rng(config.seed, stream, index)
        scene = _render(rng, config)
        samples += _image_entries(scene, config.image_tasks, _ID_PREFIX[stream] + str(index), rng, config)
    return samples


def _dense_budget(config: SyntheticConfig) -> dict[str, int]:
    """Entries per image task in the dense set of `config` (organ counts from the dense images' plans)."""
    organs = sum(len(_plan(_image_rng(config.seed, "dense", i), config)[2]) for i in range(config.num_images))
    per_task = {"cls": config.num_images, "report": config.num_images,
                "vqa": config.num_images * config.vqa_per_image, "rec": organs, "reg": organs}
    return {task: per_task[task] for task in config.image_tasks}


def _sparse(config: SyntheticConfig) -> list[Sample]:
    """The dense set's per-task entry counts spread over fresh images, one task group per image (round robin)."""
    budget = _dense_budget(config)
    groups = [g for g in (tuple(t for t in group if t in budget) for group in SPARSE_GROUPS) if g]
    left = {group: budget[group[0]] for group in groups}
    samples: list[Sample] = []
    index = 0
    while any(left.values()):
        for group in groups:
            if left[group] == 0:
                continue
            rng = _image_rng(config.seed, "sparse", index)
            scene = _render(rng, config)
            entries = _image_entries(scene, group, _ID_PREFIX["sparse"] + str(index), rng, config, left[group])
            left[group] -= sum(s.task == group[0] for s in entries)
            samples += entries
            index += 1
    return samples


def _image_entries(scene: Scene, tasks: Sequence[str], image_id: str, rng: np.random.Generator,
                   config: SyntheticConfig, limit: int | None = None) -> list[Sample]:
    """The entries of `tasks` for one scene; `limit` caps the entries per task (to hit a budget exactly)."""
    samples: list[Sample] = []
    for task in tasks:
        pairs = _TASK_WRITERS[task](scene, rng, config)[:limit]
        samples += [Sample(task=task, fields=fields, answer=answer, image=scene.image, image_id=image_id,
                           source=f"synthetic_{task}", meta=meta) for fields, answer, meta in pairs]
    return samples


def _cls(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Entry]:
    meta = {"label": MODALITIES.index(scene.modality), "classes": list(MODALITIES)}
    return [({"question": CLS_QUESTION}, scene.modality, meta)]


def _report(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Entry]:
    names = [organ.name for organ in scene.organs]
    organs = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    text = _REPORT_FINDINGS.format(modality=scene.modality, region=scene.region, organs=organs)
    lesion = scene.lesion
    second = _REPORT_NORMAL if lesion is None else _REPORT_LESION.format(
        size=lesion.size, kind=lesion.kind, quadrant=lesion.quadrant, organ=lesion.organ)
    return [({"question": REPORT_QUESTION}, f"{text} {second}", {})]


def _box_meta(organ: PlacedOrgan, size: int) -> tuple[str, dict]:
    text = encode_box(organ.xywh, size, size)
    return text, {"box": parse_box(text), "xywh": tuple(organ.xywh), "image_size": (size, size)}


def _rec(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Entry]:
    entries = []
    for organ in scene.organs:
        text, meta = _box_meta(organ, scene.image.shape[1])
        entries.append(({"object": organ.name}, text, meta))
    return entries


def _reg(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Entry]:
    entries = []
    for organ in scene.organs:
        text, meta = _box_meta(organ, scene.image.shape[1])
        entries.append(({"box": text}, organ.name, meta))
    return entries


def _vqa(scene: Scene, rng: np.random.Generator, config: SyntheticConfig) -> list[Entry]:
    """`vqa_per_image` questions, alternately closed and open, kinds drawn without repeats where possible."""
    usable = {kind for kind in (*_VQA_CLOSED, *_VQA_OPEN) if scene.lesion is not None or kind not in _LESION_KINDS}
    closed = [k for k in _VQA_CLOSED if k in usable]
    opened = [k for k in _VQA_OPEN if k in usable]
    closed_order = [closed[i] for i in rng.permutation(len(closed))]
    open_order = [opened[i] for i in rng.permutation(len(opened))]
    entries = []
    for i in range(config.vqa_per_image):
        order, answer_type = (closed_order, "closed") if i % 2 == 0 else (open_order, "open")
        kind = order[(i // 2) % len(order)]
        question, answer = _vqa_pair(kind, scene, rng)
        entries.append(({"question": question}, answer, {"answer_type": answer_type, "question_type": kind}))
    return entries


def _vqa_pair(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """One question of `kind` about `scene` and its answer, read off the ground truth."""
    lesion, names = scene.lesion, [organ.name for organ in scene.organs]
    by_level = sorted(scene.organs, key=lambda organ: organ.level)
    yes_no = ("no", "yes")
    if kind == "lesion_in_organ":
        organ = lesion.organ if lesion is not None and rng.random() < 0.5 else names[rng.integers(len(names))]
        return _VQA_CLOSED[kind].format(organ=organ), yes_no[lesion is not None and lesion.organ == organ]
    if kind == "organ_shown":
        candidates = REGIONS[scene.region]
        organ = candidates[rng.integers(len(candidates))]
        return _VQA_CLOSED[kind].format(organ=organ), yes_no[organ in names]
    answers = {
        "abnormal": lambda: yes_no[lesion is not None],
        "lesion_large": lambda: yes_no[lesion.size == "large"],
        "lesion_bright": lambda: yes_no[lesion.kind == "bright"],
        "brightest": lambda: by_level[-1].name,
        "darkest": lambda: by_level[0].name,
        "count": lambda: str(len(names)),
        "region": lambda: scene.region,
        "lesion_where": lambda: lesion.quadrant,
        "lesion_organ": lambda: lesion.organ,
        "lesion_size": lambda: lesion.size,
        "lesion_kind": lambda: lesion.kind,
    }
    return {**_VQA_CLOSED, **_VQA_OPEN}[kind], answers[kind]()


_TASK_WRITERS = {"cls": _cls, "vqa": _vqa, "report": _report, "rec": _rec, "reg": _reg}


def _qa_entries(config: SyntheticConfig, count: int, stream_offset: int) -> list[Sample]:
    """`count` text-only QA entries cycling through shuffled passes over `QA_FACTS`."""
    if "qa" not in config.tasks or count == 0:
        return []
    rng = np.random.default_rng((config.seed, _STREAMS["qa"], stream_offset))
    passes = -(-count // len(QA_FACTS))
    order = np.concatenate([rng.permutation(len(QA_FACTS)) for _ in range(passes)])[:count]
    samples = []
    for i in order:
        question, answer = QA_FACTS[i]
        meta = {"answer_type": "closed" if answer in ("yes", "no") else "open"}
        samples.append(Sample(task="qa", fields={"question": question}, answer=answer, source="synthetic_qa",
                              meta=meta))
    return samples


# --- vocabulary ------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def _literal_text(template: str) -> str:
    """`template` with its ``{fields}`` removed."""
    return " ".join(literal for literal, *_ in string.Formatter().parse(template))


def _all_texts() -> list[str]:
    """Every fixed string the generator and the prompt template can emit (fields left out)."""
    texts = [*MODALITIES, *REGIONS, *ORGAN_LEVELS, *QUADRANTS, *LESION_LEVELS, *LESION_RADII, "yes no",
             CLS_QUESTION, REPORT_QUESTION, _REPORT_NORMAL, ", and { } < >", *(str(n) for n in range(101))]
    texts += [_literal_text(t) for t in (*_VQA_CLOSED.values(), *_VQA_OPEN.values(), _REPORT_FINDINGS,
                                         _REPORT_LESION)]
    texts += [text for fact in QA_FACTS for text in fact]
    for task in TASKS.values():
        fields = {name: "" for _, name, *_ in string.Formatter().parse(task.template) if name}
        parts = build_prompt(task, fields, answer="yes")
        texts += [parts.prompt, parts.answer]
    return texts


VOCABULARY: tuple[str, ...] = tuple(sorted({word for text in _all_texts() for word in split_words(text)}))
"""Every word (`split_words`) of every prompt and answer the generator can produce, numbers 0–100 included."""
