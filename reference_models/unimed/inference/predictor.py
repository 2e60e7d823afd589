"""Ask a trained Uni-Med model about images of one's own: `UniMedPredictor`.

Load a model from a run folder (its config is read from the checkpoint), a checkpoint with its config, or a
converted original checkpoint with the config and ``--set`` flags the converter printed; then `ask` it one
question or `ask_batch` many. Each `Answer` holds the text as `cmoe unimed eval` would generate it for the same
sample (the run's prompt style included), the prompt asked, for REC the parsed box in pixels of the given image,
and the routing: the connector's mean weight per expert over the image's visual tokens (per token when asked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from cmoe.errors import CMoEError, UnknownNameError
from cmoe.reference_models.unimed.boxes import SCALE, parse_box
from cmoe.reference_models.unimed.config import RecipeConfig, config_from_dict, load_config
from cmoe.reference_models.unimed.data.images import to_pil
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.data.synthetic import CLS_QUESTION, REPORT_QUESTION
from cmoe.reference_models.unimed.evaluation.evaluate import load_checkpoint_model
from cmoe.reference_models.unimed.model.checkpoint import read_checkpoint, read_latest
from cmoe.reference_models.unimed.model.collate import Collator, sample_prompt
from cmoe.reference_models.unimed.tasks import TASKS

ImageInput = Union[str, os.PathLike, np.ndarray, Any]
"""A path to an image file, an ``[H, W]`` / ``[H, W, 3]`` uint8 array, or a PIL image."""

TEXT_FIELD = {"qa": "question", "vqa": "question", "report": "question", "rec": "object", "reg": "box",
              "cls": "question"}
"""The instruction field the text of each task fills."""
MIMIC_REPORT_QUESTION = "Describe the given chest x-ray image in detail."


@dataclass
class Request:
    """One question: an image (none for ``qa``), a task, and the text it needs — the question (``qa``,
    ``vqa``; ``report`` and ``cls`` have a default), the object to locate (``rec``), or for ``reg`` a box: pixel
    corners ``(x1, y1, x2, y2)`` of the image in `box`, or ``{<x1><y1><x2><y2>}`` on the 0–100 grid in `text`."""

    task: str
    image: ImageInput = None
    text: str | None = None
    box: Sequence[float] | None = None


@dataclass
class Answer:
    """What the model said: `answer`, the `prompt` it was asked with, for ``rec`` the `box` it gave in pixels
    ``(x1, y1, x2, y2)`` of the input image (None when the answer holds no box), the image's `size`, and
    `routing`: the mean combine weight per expert over the visual tokens (`routing_per_token` ``[tokens][E]``
    when asked; both None for an MLP connector or a text-only task)."""

    task: str
    answer: str
    prompt: str
    box: tuple[float, float, float, float] | None = None
    size: tuple[int, int] | None = None
    routing: list[float] | None = None
    routing_per_token: list[list[float]] | None = None
    request: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "answer": self.answer, "prompt": self.prompt, "box": self.box,
                "image_size": self.size, "routing": self.routing, "routing_per_token": self.routing_per_token,
                **({"request": self.request} if self.request else {})}


def image_array(image: ImageInput) -> np.ndarray:
    """`image` as an ``[H, W, 3]`` uint8 array (a clear error for a missing or unreadable file)."""
    if isinstance(image, np.ndarray):
        return np.asarray(to_pil(image))
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        return np.asarray(image.convert("RGB"))
    if image is None:
        raise CMoEError("image: this task needs an image (a path, a PIL image or a uint8 array)")
    path = Path(image)
    if not path.is_file():
        raise CMoEError(f"image: {path}: no such file")
    try:
        return np.asarray(to_pil(path))
    except CMoEError:
        raise
    except Exception as error:  # PIL's UnidentifiedImageError, truncated files, ...
        raise CMoEError(f"image: {path}: cannot be read as an image ({type(error).__name__}: {error})") from None


def grid_box(box: Sequence[float], width: int, height: int) -> str:
    """Pixel corners ``(x1, y1, x2, y2)`` → ``{<x1><y1><x2><y2>}`` on the 0–100 grid (the original's
    ``int(v / size · 100)``), with a clear error for a box that is not four numbers inside the image."""
    values = [float(v) for v in box]
    if len(values) != 4 or not (0 <= values[0] <= values[2] <= width and 0 <= values[1] <= values[3] <= height):
        raise CMoEError(f"box: expected x1,y1,x2,y2 in pixels with x1 <= x2 <= {width} and y1 <= y2 <= {height} "
                        f"(the image's size), got {box}")
    corners = (values[0] / width, values[1] / height, values[2] / width, values[3] / height)
    return "{" + "".join(f"<{int(c * SCALE)}>" for c in corners) + "}"


class UniMedPredictor:
    """A loaded model and the config it was trained with; `ask` / `ask_batch` answer `Request`s."""

    def __init__(self, model, config: RecipeConfig, checkpoint: Path, step: int, device: str = "cpu"):
        self.model, self.config, self.checkpoint, self.step, self.device = model, config, checkpoint, step, device
        self.style = config.prompts.resolved()
        self.collator = Collator(model.tokenizer, model.vision_encoder.image_size, config.model.image_mean,
                                 config.model.image_std, config.model.max_text_tokens, with_answers=False,
                                 style=self.style)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 device: str | None = None) -> UniMedPredictor:
        """The latest checkpoint of a run folder written by ``cmoe unimed train`` (or `checkpoint` in it), built
        from the config the checkpoint recorded: nothing else is needed."""
        def build(path: Path) -> UniMedPredictor:
            state = read_checkpoint(path)["state"]
            if "config" not in state:
                raise CMoEError(f"checkpoint {path}: it records no config (a converted original checkpoint?); use "
                                "UniMedPredictor.from_checkpoint(path, config, overrides) with the converter's flags")
            return cls.from_checkpoint(path, config_from_dict(state["config"]), device=device)

        return build(Path(checkpoint)) if checkpoint is not None else read_latest(run_dir, build)[1]

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None, config: RecipeConfig | str | os.PathLike,
                        overrides: dict[str, Any] | None = None, device: str | None = None) -> UniMedPredictor:
        """`checkpoint` (None: the config's run's latest; a converted original checkpoint works too) with
        `config` (a `RecipeConfig`, a built-in name or a YAML path, plus `overrides`)."""
        if not isinstance(config, RecipeConfig):
            config = load_config(config, overrides)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        path, model, step = load_checkpoint_model(config, checkpoint, device)
        return cls(model, config, path, step, device)

    def default_text(self, task: str) -> str | None:
        """The question a ``report`` or ``cls`` request gets when it brings none."""
        synthetic = self.config.data.synthetic is not None
        if task == "report":
            return REPORT_QUESTION if synthetic else MIMIC_REPORT_QUESTION
        if task == "cls" and synthetic:
            return CLS_QUESTION
        return None

    def sample(self, request: Request) -> tuple[Sample, tuple[int, int] | None]:
        """The `Sample` a request is asked as, and its image's ``(width, height)``; bad requests raise one
        `CMoEError` naming what is wrong."""
        if request.task not in TASKS:
            raise UnknownNameError("task", request.task, TASKS)
        task = TASKS[request.task]
        array = image_array(request.image) if task.has_image else None
        size = (array.shape[1], array.shape[0]) if array is not None else None
        text = request.text if request.text not in (None, "") else self.default_text(request.task)
        if request.task == "reg" and request.box is not None:
            text = grid_box(request.box, *size)
        if not text:
            needs = {"rec": "the object to locate (--text 'liver')",
                     "reg": "a box: --box x1,y1,x2,y2 in pixels, or --text '{<x1><y1><x2><y2>}' on the 0-100 grid",
                     "cls": "the question listing the classes"}.get(request.task, "a question")
            raise CMoEError(f"{request.task}: the request has no text; it needs {needs}")
        if request.task == "reg" and parse_box(text) is None:
            raise CMoEError(f"reg: {text!r} is not a box; give --box x1,y1,x2,y2 in pixels or "
                            "'{<x1><y1><x2><y2>}' on the 0-100 grid")
        sample = Sample(request.task, {TEXT_FIELD[request.task]: text}, "", array, source="request",
                        meta={"instruction_words": None})
        return sample, size

    def ask_batch(self, requests: Sequence[Request], routing_per_token: bool = False) -> list[Answer]:
        """Answers to `requests`, asked together in batches of ``eval.batch_size`` (greedy, as evaluation)."""
        return self.answer_prepared(requests, [self.sample(request) for request in requests], routing_per_token)

    @torch.no_grad()
    def answer_prepared(self, requests: Sequence[Request], prepared: Sequence[tuple[Sample, tuple[int, int] | None]],
                        routing_per_token: bool = False) -> list[Answer]:
        """`ask_batch` for requests already turned into samples by `sample` (each image read once)."""
        answers: list[Answer] = []
        size = self.config.eval.batch_size
        for start in range(0, len(prepared), size):
            chunk = prepared[start:start + size]
            batch = self.collator([sample for sample, _ in chunk]).to(self.device)
            texts, routing = self.model.generate_with_routing(batch, self.config.eval.max_new_tokens, self.style)
            image_index = 0
            for (sample, image_size), text, request in zip(chunk, texts, requests[start:start + size]):
                answer = Answer(sample.task, text, sample_prompt(sample, self.style, training=False).prompt,
                                size=image_size, request=_describe(request))
                if sample.task in ("rec",):
                    box = parse_box(text)
                    if box is not None:
                        w, h = image_size
                        answer.box = (box.x1 * w / SCALE, box.y1 * h / SCALE, box.x2 * w / SCALE, box.y2 * h / SCALE)
                if TASKS[sample.task].has_image:
                    if routing is not None:
                        weights = routing[image_index].float().cpu()
                        answer.routing = weights.mean(0).tolist()
                        answer.routing_per_token = weights.tolist() if routing_per_token else None
                    image_index += 1
                answers.append(answer)
        return answers

    def ask(self, image: ImageInput, task: str, text: str | None = None, box: Sequence[float] | None = None,
            routing_per_token: bool = False) -> Answer:
        """One question about one image (`image` None for ``qa``); see `Request` for `text` and `box`."""
        return self.ask_batch([Request(task, image, text, box)], routing_per_token)[0]

    def describe(self) -> str:
        """One line: which checkpoint, step and prompt setting this predictor runs with."""
        return (f"{self.config.name}: checkpoint {self.checkpoint} (step {self.step}), prompts {self.style.style}, "
                f"device {self.device}")


def _describe(request: Request) -> dict[str, Any]:
    image = request.image
    name = str(image) if isinstance(image, (str, os.PathLike)) else (None if image is None else type(image).__name__)
    return {"task": request.task, "image": name, "text": request.text,
            "box": list(request.box) if request.box is not None else None}

