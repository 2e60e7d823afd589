"""The web demo (``cmoe unimed serve``) as a person uses it, through its HTTP API: started as a subprocess on
127.0.0.1, driven with `gradio_client` (pick an example, upload a PNG, ask VQA, REC and REG), stopped.

Every answer must be the one `UniMedPredictor.ask` gives for the same image and text, the chart its routing, the
REG box drawn where it was asked; bad input is one message naming what is wrong; the page names the checkpoint.
Without the ``cmoe[demo]`` extra the command is one line naming the pip command.
"""

from __future__ import annotations

import importlib.metadata
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.inference.examples import examples
from cmoe.reference_models.unimed.inference.predictor import Answer, Request, UniMedPredictor
from cmoe.reference_models.unimed.inference import web
from cmoe.reference_models.unimed.inference.web import drawn_image, page_request, serve

from unimed_server import Server

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest): a new Gradio must not break the demo

gradio_client = pytest.importorskip("gradio_client", reason="the web demo needs cmoe[demo] (gradio, gradio_client)")
from gradio_client.exceptions import AppError  # noqa: E402


@pytest.fixture(scope="module")
def server(run: Path, tmp_path_factory: pytest.TempPathFactory):
    started = Server(run, tmp_path_factory.mktemp("serve_logs"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def client(server: Server, tmp_path_factory: pytest.TempPathFactory):
    return gradio_client.Client(server.url, verbose=False, analytics_enabled=False,
                                download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image of the test's own: example 3 mirrored, enlarged to 64×48, saved as a grey-scale PNG."""
    image = Image.fromarray(examples()[2].image[:, ::-1, 0]).resize((64, 48), Image.BICUBIC)
    path = tmp_path_factory.mktemp("upload") / "my scan.png"
    image.save(path)
    return path


def chart(value: dict) -> list[float]:
    assert value["columns"] == ["expert", "weight"]
    assert [row[0] for row in value["data"]] == [f"expert {i}" for i in range(len(value["data"]))]
    return [row[1] for row in value["data"]]


@pytest.mark.parametrize("task", ["vqa", "rec"])
def test_an_example_image_answers_as_the_predictor(client, predictor: UniMedPredictor, task: str) -> None:
    example = examples()[1]
    picked, text = client.predict(example.name, task, api_name="/pick_example")
    assert text == example.texts[task]
    assert np.array_equal(np.asarray(Image.open(picked)), example.image)  # the page holds the example, lossless
    answer, drawn, experts = client.predict(gradio_client.handle_file(picked), task, text, api_name="/ask")
    expected = predictor.ask(example.image, task, text)
    assert answer == expected.answer
    assert chart(experts) == pytest.approx(expected.routing, abs=1e-6)
    assert (drawn is not None) == (expected.box is not None)


@pytest.mark.parametrize("task, text", [("vqa", "is there a lesion in the liver?"), ("rec", "kidney"),
                                        ("report", ""), ("cls", ""), ("qa", "what does the liver do?")])
def test_an_uploaded_png_answers_as_the_predictor(client, predictor: UniMedPredictor, scan: Path, task: str,
                                                  text: str) -> None:
    answer, _, experts = client.predict(gradio_client.handle_file(str(scan)), task, text, api_name="/ask")
    expected = predictor.ask(None if task == "qa" else str(scan), task, text or None)
    assert answer == expected.answer
    if task == "qa":  # text only: no routing, an empty chart
        assert experts is None and expected.routing is None
    else:
        assert chart(experts) == pytest.approx(expected.routing, abs=1e-6) and expected.size == (64, 48)


def test_reg_with_a_pixel_box_draws_it_and_answers_as_the_predictor(client, predictor: UniMedPredictor,
                                                                      scan: Path) -> None:
    answer, drawn, _ = client.predict(gradio_client.handle_file(str(scan)), "reg", "4, 8, 20, 24", api_name="/ask")
    assert answer == predictor.ask(str(scan), "reg", box=(4, 8, 20, 24)).answer
    picture = np.asarray(Image.open(drawn).convert("RGB"))
    assert picture.shape == (192, 256, 3)  # enlarged 4× for display
    assert tuple(picture[32, 48]) == (255, 40, 40) and tuple(picture[60, 48]) != (255, 40, 40)  # edge, inside
    grid = client.predict(gradio_client.handle_file(str(scan)), "reg", "{<6><16><31><50>}", api_name="/ask")[0]
    assert grid == predictor.ask(str(scan), "reg", "{<6><16><31><50>}").answer


def test_the_page_names_the_checkpoint_step_and_prompt_setting(client, predictor: UniMedPredictor,
                                                               run: Path) -> None:
    shown = [c["props"]["value"] for c in client.config["components"] if c["props"].get("elem_id") == "model-info"]
    assert len(shown) == 1 and predictor.describe() in shown[0]
    assert str(run / "step_00000004") in shown[0] and "(step 4), prompts cmoe" in shown[0]


@pytest.mark.parametrize("inputs, message", [
    ((None, "vqa", "is the liver shown?"), "image: vqa needs an image; upload one or pick an example image"),
    (("scan", "rec", "  "), "rec: the text box is empty; type the object to locate, e.g. liver"),
    (("scan", "reg", "the liver"), "reg: 'the liver' is not a box; type a box: pixel corners x1,y1,x2,y2"),
    (("scan", "reg", "0,0,99,20"), "box: expected x1,y1,x2,y2 in pixels with x1 <= x2 <= 64 and y1 <= y2 <= 48"),
    (("broken", "vqa", "q"), "image: broken.png cannot be read as an image (UnidentifiedImageError); upload a PNG"),
    (("scan", "segment", "q"), "'segment'"),
])
def test_bad_input_is_one_message_naming_what_is_wrong(client, scan: Path, tmp_path: Path, inputs: tuple,
                                                      message: str) -> None:
    (tmp_path / "broken.png").write_text("not an image")
    files = {"scan": str(scan), "broken": str(tmp_path / "broken.png")}
    image = gradio_client.handle_file(files[inputs[0]]) if inputs[0] else None
    with pytest.raises(AppError) as raised:
        client.predict(image, *inputs[1:], api_name="/ask")
    shown = str(raised.value)
    assert message in shown and "Traceback" not in shown and len(shown.splitlines()) == 1


def test_the_server_stops_on_sigterm_and_leaves_nothing_behind(server: Server) -> None:
    assert server.stop() == 0
    assert server.stderr.read_text().rstrip().endswith("stopped")
    assert not Path(web.__file__).with_suffix(".pyi").exists()  # Gradio writes one for a component subclass


def test_a_port_in_use_or_out_of_range_is_one_clear_error(run: Path, predictor: UniMedPredictor, capsys) -> None:
    from cmoe.reference_models.unimed.cli import main

    assert main(["serve", "--config", "tiny", "--output-dir", str(run), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port: expected 0 (a free port) or 1-65535, got 70000"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CMoEError) as raised:
            serve(predictor, "127.0.0.1", port)
    assert str(raised.value) == (f"--port: cannot listen on 127.0.0.1:{port} (in use, or --host is not an address "
                                 "of this machine); pass another --port, or 0 for a free one")


def test_page_request_reads_the_text_box_as_each_task_needs() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    assert page_request(image, "reg", " (4, 8.5, 20, 24) ").box == [4, 8.5, 20, 24]
    grid = page_request(image, "reg", "{<1><2><3><4>}")
    assert (grid.text, grid.box) == ("{<1><2><3><4>}", None) and grid.image.shape == (48, 64, 3)
    assert page_request(image, "qa", "why?").image is None
    assert page_request(image, "report", "").text is None  # the predictor's default instruction
    with pytest.raises(CMoEError, match="task: expected one of vqa, report, rec, reg, cls, qa, got 'x'"):
        page_request(image, "x", "q")


def test_a_rec_answer_box_is_drawn_enlarged() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    answer = Answer("rec", "{<25><25><75><75>}", "", box=(8.0, 8.0, 24.0, 24.0), size=(32, 32))
    picture = np.asarray(drawn_image(Request("rec", image, "liver"), answer))
    assert picture.shape == (256, 256, 3) and tuple(picture[64, 128]) == (255, 40, 40)
    assert drawn_image(Request("rec", image, "liver"), Answer("rec", "no box", "")) is None


def test_without_the_demo_extra_serve_is_one_line_naming_the_pip_command(run: Path, monkeypatch, capsys) -> None:
    import cmoe.extras
    from cmoe.reference_models.unimed.cli import main

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name.lower() == "gradio":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(cmoe.extras.metadata, "version", version)
    monkeypatch.setattr(cmoe.extras, "_satisfied", set())
    assert main(["serve", "--config", "tiny", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cmoe unimed serve needs cmoe[demo]: gradio is not installed. Install it with pip install "
                   "'cmoe[demo]' (from a clone: pip install -e '.[demo]')"]
