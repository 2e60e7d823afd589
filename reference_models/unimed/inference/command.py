"""``cmoe unimed predict``: one image and question, an example image, or a JSONL manifest of requests → answers.

A manifest line is ``{"image": path (relative to the manifest's folder), "task": ..., "text": ..., "box":
[x1, y1, x2, y2]}``; the output has one JSON line per input line, its ``line`` number and either the answer (text,
prompt, box, routing) or the ``error`` that line has. Every bad line is also named on stderr and the command exits
2, after answering the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cmoe.checkpointing import atomic_write
from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.boxes import parse_pixel_box
from cmoe.reference_models.unimed.inference.predictor import Answer, Request, UniMedPredictor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an image file to ask about (with --task and --text)")
    what.add_argument("--manifest", help="a JSONL file of requests: image, task, text (and box for reg)")
    what.add_argument("--example", type=int, metavar="N",
                      help="ask about the N-th example image (1-4, synthetic test scans; --text defaults to its "
                           "question for the task)")
    what.add_argument("--no-image", action="store_true", help="a text-only question (task qa)")
    parser.add_argument("--task", help="qa, vqa, report, rec, reg or cls (with --image, --example or --no-image)")
    parser.add_argument("--text", help="the question, the object to locate (rec), or a 0-100 grid box (reg)")
    parser.add_argument("--box", help="reg: the box to name, x1,y1,x2,y2 in pixels of the image")
    parser.add_argument("--checkpoint", help="a checkpoint folder (default: the latest of the run folder)")
    parser.add_argument("--out", help="manifest answers as JSONL here (default: stdout)")
    parser.add_argument("--draw", metavar="DIR", help="write each rec/reg image with its box drawn into DIR")
    parser.add_argument("--routing-per-token", action="store_true", help="also give each visual token's weights")
    parser.add_argument("--json", action="store_true", help="print a single answer as JSON")


def load_predictor(args: argparse.Namespace, config_loader) -> UniMedPredictor:
    """A checkpoint with the config of ``--config``/``--set``, or the run folder's latest with its own config."""
    if args.checkpoint is not None:
        return UniMedPredictor.from_checkpoint(args.checkpoint, config_loader(args))
    config = config_loader(args)
    return UniMedPredictor.from_run(config.output_dir)


def _box(text: str | None) -> list[float] | None:
    if text is None:
        return None
    values = parse_pixel_box(text)
    if values is None:
        raise CMoEError(f"--box: expected x1,y1,x2,y2 (four numbers in pixels), got {text!r}")
    return values


def _draw(directory: str, name: str, image: Any, box: Any) -> Path:
    from cmoe.reference_models.unimed.inference.drawing import draw_box
    from cmoe.reference_models.unimed.inference.predictor import image_array

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    draw_box(image_array(image), box).save(path)
    return path


def box_to_draw(request: Request, answer: Answer) -> Any:
    """The box a rec answer or a reg request is about, in pixels; None when there is none."""
    if answer.task == "rec":
        return answer.box
    if answer.task == "reg" and answer.size is not None:
        from cmoe.reference_models.unimed.boxes import SCALE, parse_box

        if request.box is not None:
            return request.box
        box = parse_box(request.text or "")
        w, h = answer.size
        return None if box is None else (box.x1 * w / SCALE, box.y1 * h / SCALE, box.x2 * w / SCALE,
                                         box.y2 * h / SCALE)
    return None


def _single(args: argparse.Namespace, predictor: UniMedPredictor) -> int:
    if args.task is None:
        raise CMoEError("--task: required with --image, --example or --no-image (qa, vqa, report, rec, reg, cls)")
    image, text, name = args.image, args.text, Path(args.image).stem if args.image else "question"
    if args.example is not None:
        from cmoe.reference_models.unimed.inference.examples import examples

        shipped = examples()
        if not 1 <= args.example <= len(shipped):
            raise CMoEError(f"--example: expected 1 to {len(shipped)}, got {args.example}")
        example = shipped[args.example - 1]
        image, name = example.image, example.name
        text = text if text is not None else example.texts.get(args.task)
    request = Request(args.task, None if args.no_image else image, text, _box(args.box))
    answer = predictor.ask_batch([request], args.routing_per_token)[0]
    if args.draw:
        box = box_to_draw(request, answer)
        if box is not None:
            print(f"drew {_draw(args.draw, f'{name}-{args.task}', request.image, box)}", file=sys.stderr)
    if args.json:
        print(json.dumps(answer.to_dict()))
    else:
        print(answer.answer)
        if answer.box is not None:
            print("box (pixels x1, y1, x2, y2): " + ", ".join(f"{v:.1f}" for v in answer.box))
        if answer.routing is not None:
            print("experts (mean weight over the visual tokens): "
                  + ", ".join(f"{i}: {w:.3f}" for i, w in enumerate(answer.routing)))
    return 0


def _manifest(args: argparse.Namespace, predictor: UniMedPredictor) -> int:
    from tqdm import tqdm

    path = Path(args.manifest)
    if not path.is_file():
        raise CMoEError(f"--manifest: {path}: no such file")
    results: dict[int, dict[str, Any]] = {}
    prepared: list[tuple[int, Request, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            if not line.strip():
                raise CMoEError("empty line; expected a JSON object with image, task and text")
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise CMoEError(f"not JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(item, dict) or "task" not in item:
                raise CMoEError("expected a JSON object with at least a task (and image, text)")
            unknown = sorted(set(item) - {"image", "task", "text", "box"})
            if unknown:
                raise CMoEError(f"unknown key(s) {unknown}; known: image, task, text, box")
            image = item.get("image")
            if image is not None and not Path(image).is_absolute():
                image = str(path.parent / image)
            request = Request(item["task"], image, item.get("text"), item.get("box"))
            # checks the request (image readable, task known, text present) and reads its image, once
            prepared.append((number, request, predictor.sample(request)))
        except CMoEError as error:
            results[number] = {"line": number, "error": str(error)}
    size = predictor.config.eval.batch_size
    with tqdm(total=len(prepared), desc="predict", unit="request", file=sys.stderr,
              disable=not prepared) as progress:
        for start in range(0, len(prepared), size):
            chunk = prepared[start:start + size]
            answers = predictor.answer_prepared([request for _, request, _ in chunk],
                                                [sample for _, _, sample in chunk], args.routing_per_token)
            for (number, request, _), answer in zip(chunk, answers):
                results[number] = {"line": number, **answer.to_dict()}
                box = box_to_draw(request, answer) if args.draw else None
                if box is not None:
                    _draw(args.draw, f"line{number}-{answer.task}", request.image, box)
            progress.update(len(chunk))
    lines = "".join(json.dumps(results[n]) + "\n" for n in sorted(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
        print(f"wrote {len(results)} answers to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    errors = [results[n] for n in sorted(results) if "error" in results[n]]
    for error in errors:
        print(f"error: {path}:{error['line']}: {error['error']}", file=sys.stderr)
    return 2 if errors else 0


def run(args: argparse.Namespace, config_loader) -> int:
    predictor = load_predictor(args, config_loader)
    print(predictor.describe(), file=sys.stderr)
    return _manifest(args, predictor) if args.manifest else _single(args, predictor)
