"""Using a trained model: `UniMedPredictor` (Python) and ``cmoe unimed predict`` (command line) on a tiny run.

The answers must be the ones ``cmoe unimed eval`` generates for the same samples; images come as paths, PIL
images or arrays; REC boxes come back in pixels of the given image, REG takes a pixel box; routing is one weight
per expert per visual token; every bad request is one line and exit code 2, a manifest's other lines answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.evaluation.evaluate import evaluate_model, load_trained_model
from cmoe.reference_models.unimed.inference.examples import examples
from cmoe.reference_models.unimed.inference.predictor import Request, UniMedPredictor, grid_box

from unimed_tiny import test_config as tiny_config

FIELD = {"qa": "question", "vqa": "question", "report": "question", "rec": "object", "reg": "box", "cls": "question"}


def test_answers_are_what_eval_generates_for_the_same_samples(run: Path, predictor: UniMedPredictor) -> None:
    config = tiny_config(run)
    samples = load_split(config.data, "test")
    picked = [s for task in FIELD for s in [x for x in samples if x.task == task][:2]]
    model, _ = load_trained_model(config, None)
    _, records = evaluate_model(model, picked, config, limit_per_task=2)
    answers = predictor.ask_batch([Request(s.task, s.image, s.fields[FIELD[s.task]]) for s in picked])
    assert [(r["task"], r["fields"]) for r in records] == [(s.task, s.fields) for s in picked]  # same order
    assert [a.answer for a in answers] == [r["prediction"] for r in records]
    for sample, answer in zip(picked, answers):
        assert (answer.routing is None) == (sample.task == "qa")
        if answer.routing is not None:
            assert len(answer.routing) == 5 and abs(sum(answer.routing) - 1) < 1e-5
    assert "step 4" in predictor.describe() and "prompts cmoe" in predictor.describe()


def test_images_as_paths_pil_or_arrays_give_the_same_answer(predictor: UniMedPredictor, tmp_path: Path) -> None:
    example = examples()[0]
    path = tmp_path / "scan.png"
    Image.fromarray(example.image).save(path)
    asked = [predictor.ask(image, "vqa", example.texts["vqa"], routing_per_token=True)
             for image in (example.image, Image.fromarray(example.image), str(path), example.image[..., 0])]
    assert len({a.answer for a in asked}) == 1 and len({tuple(a.routing) for a in asked}) == 1
    per_token = np.asarray(asked[0].routing_per_token)
    assert per_token.shape == (16, 5) and np.allclose(per_token.sum(1), 1, atol=1e-5)
    assert np.allclose(per_token.mean(0), asked[0].routing, atol=1e-6)


def test_rec_box_in_pixels_and_reg_box_from_pixels(predictor: UniMedPredictor, monkeypatch) -> None:
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    seen = []

    def fake(batch, max_new_tokens, style):
        seen.extend(text.after for text in batch.texts)
        return ["{<10><20><30><40>}"] * len(batch), None

    monkeypatch.setattr(predictor.model, "generate_with_routing", fake)
    rec = predictor.ask(image, "rec", "liver")
    assert rec.box == pytest.approx((6.4, 6.4, 19.2, 12.8)) and rec.size == (64, 32)
    reg = predictor.ask(image, "reg", box=(16, 8, 48, 24))
    assert "{<25><25><75><75>}" in reg.prompt and reg.box is None
    assert grid_box((0, 0, 64, 32), 64, 32) == "{<0><0><100><100>}"
    with pytest.raises(CMoEError, match="x1 <= x2 <= 64"):
        grid_box((10, 0, 80, 10), 64, 32)


@pytest.mark.parametrize("request_, message", [
    (Request("segment", None, "x"), "unknown task 'segment'; known tasks: cls, qa, rec, reg, report, vqa"),
    (Request("rec", np.zeros((8, 8, 3), np.uint8)), "rec: the request has no text; it needs the object"),
    (Request("reg", np.zeros((8, 8, 3), np.uint8), "the liver"), "'the liver' is not a box"),
    (Request("vqa", "/no/such/scan.png", "q"), "no such file"),
    (Request("vqa", None, "q"), "this task needs an image"),
])
def test_bad_requests_name_what_is_wrong(predictor: UniMedPredictor, request_: Request, message: str) -> None:
    with pytest.raises(CMoEError, match=message.replace("(", r"\(").replace("[", r"\[")):
        predictor.ask_batch([request_])


def test_command_line_single_example_json_and_draw(run: Path, predictor: UniMedPredictor, tmp_path: Path,
                                                   capsys) -> None:
    base = ["predict", "--config", "tiny", "--output-dir", str(run)]
    assert main([*base, "--example", "2", "--task", "vqa", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    example = examples()[1]
    assert printed["answer"] == predictor.ask(example.image, "vqa", example.texts["vqa"]).answer
    assert main([*base, "--example", "1", "--task", "reg", "--box", "4,8,20,24", "--draw", str(tmp_path)]) == 0
    drawn = np.asarray(Image.open(tmp_path / "example-1-reg.png"))
    assert tuple(drawn[8, 12]) == (255, 40, 40)  # the top edge of the box
    assert main([*base, "--no-image", "--task", "qa", "--text", "what does the liver do?"]) == 0
    assert capsys.readouterr().out.strip()


def test_command_line_manifest_answers_good_lines_and_names_bad_ones(run: Path, tmp_path: Path, capsys) -> None:
    for example in examples()[:2]:
        Image.fromarray(example.image).save(tmp_path / f"{example.name}.png")
    (tmp_path / "broken.png").write_text("not an image")
    lines = [{"image": "example-1.png", "task": "vqa", "text": "is there a lesion in the heart?"}, "",
             {"image": "missing.png", "task": "vqa", "text": "q"}, {"image": "broken.png", "task": "vqa", "text": "q"},
             {"image": "example-2.png", "task": "reg", "box": [4, 8, 20, 24]}, {"task": "qa", "text": "why?"},
             {"image": "example-1.png", "task": "rec"}, "{not json", {"image": "example-1.png", "task": "cls"}]
    manifest = tmp_path / "requests.jsonl"
    manifest.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    out = tmp_path / "answers.jsonl"
    code = main(["predict", "--config", "tiny", "--output-dir", str(run), "--manifest", str(manifest),
                 "--out", str(out), "--draw", str(tmp_path / "drawn")])
    assert code == 2
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["line"] for a in answers] == list(range(1, 10))
    assert [n for n, a in enumerate(answers, 1) if "error" in a] == [2, 3, 4, 7, 8]
    assert all(a["answer"] is not None and a["request"]["task"] == a["task"] for a in answers if "error" not in a)
    assert answers[0]["request"]["image"].endswith("example-1.png")
    err = capsys.readouterr().err
    for number, text in [(2, "empty line"), (3, "no such file"), (4, "cannot be read as an image"),
                         (7, "needs the object"), (8, "not JSON")]:
        assert f"{manifest}:{number}: " in err and text in err
    assert (tmp_path / "drawn" / "line5-reg.png").is_file()


def test_command_line_bad_input_is_one_line_and_exit_2(run: Path, tmp_path: Path, capsys) -> None:
    base = ["predict", "--config", "tiny", "--output-dir", str(run)]
    cases = [([*base, "--image", str(tmp_path / "none.png"), "--task", "vqa", "--text", "q"], "no such file"),
             ([*base, "--example", "1", "--task", "segment"], "unknown task 'segment'"),
             ([*base, "--example", "1", "--task", "rec", "--text", ""], "needs the object to locate"),
             ([*base, "--example", "9", "--task", "vqa"], "--example: expected 1 to 4"),
             ([*base, "--example", "1", "--task", "reg", "--box", "1,2"], "--box: expected x1,y1,x2,y2"),
             (["predict", "--config", "tiny_random", "--checkpoint", str(run / "step_00000004"), "--example", "1",
               "--task", "vqa"], "frozen weights differ"),
             (["predict", "--config", "tiny", "--output-dir", str(tmp_path / "empty"), "--example", "1", "--task",
               "vqa"], "no checkpoint")]
    for argv, message in cases:
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], (argv, err)
