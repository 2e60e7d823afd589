"""The web demo in a real headless browser (Debian's chromium + chromium-driver, selenium), as a person uses it:
load the page, upload an image file, choose the task, type the question, press Ask, read the answer — the one
`UniMedPredictor.ask` gives — see the expert chart, take a screenshot that is not blank; pick an example and see
its question filled in; leave the box empty and read the one message that says so.

Marked ``browser`` (make test-browser runs only these, after installing chromium); skipped with the reason where
chromium, chromedriver or selenium are missing, unless CMOE_BROWSER_REQUIRED=1 (that stage), where they fail.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmoe.reference_models.unimed.inference.examples import examples
from cmoe.reference_models.unimed.inference.predictor import UniMedPredictor

from unimed_browser import Page, missing_browser, small_png, start_browser
from unimed_server import Server

pytestmark = pytest.mark.browser

REASON = missing_browser()
if REASON and os.environ.get("CMOE_BROWSER_REQUIRED") == "1":
    pytest.fail(f"CMOE_BROWSER_REQUIRED=1 (make test-browser) but the browser test cannot run: {REASON}",
                pytrace=False)
if REASON:
    pytest.skip(REASON, allow_module_level=True)
pytest.importorskip("gradio", reason="the web demo needs cmoe[demo] (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def server(run: Path, tmp_path_factory: pytest.TempPathFactory):
    started = Server(run, tmp_path_factory.mktemp("browser_logs"))
    yield started
    assert started.stop() == 0


@pytest.fixture(scope="module")
def driver():
    browser = start_browser()
    yield browser
    browser.quit()


def test_upload_ask_and_read_the_answer_in_the_browser(server: Server, driver, run: Path, tmp_path: Path) -> None:
    example = examples()[2]
    scan = tmp_path / "scan.png"
    Image.fromarray(example.image[::-1]).resize((48, 48), Image.NEAREST).save(scan)  # an image of the test's own
    question = "is there a lesion in the lung?"
    expected = UniMedPredictor.from_run(run).ask(str(scan), "vqa", question)
    assert expected.answer, "the model answers this with an empty text: pick another question"

    page = Page(driver, server.url)
    assert "(step 4), prompts cmoe" in page.find("#model-info").text
    page.upload(scan)
    page.choose_task("report")
    page.choose_task("vqa")
    page.type_text(question)
    assert page.ask() == expected.answer
    assert len(page.bars()) == len(expected.routing) == 5

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    assert shot.shape[0] > 500 and shot.shape[1] > 800
    assert shot.std() > 20, "the screenshot is (nearly) one colour"
    assert len(np.unique(shot.reshape(-1, 3)[::7], axis=0)) > 50, "the screenshot has too few colours to be a page"
    size = small_png(page.screenshot(), tmp_path / "page.png")
    assert 0 < size <= 150_000


def test_an_example_fills_in_its_question_and_an_empty_box_is_one_message(server: Server, driver) -> None:
    example = examples()[1]
    page = Page(driver, server.url)
    page.choose_task("rec")
    page.pick_example(example.name)
    page.wait.until(lambda _: page.text() == example.texts["rec"])
    page.choose_task("vqa")
    page.wait.until(lambda _: page.text() == example.texts["vqa"])
    page.type_text("")
    page.find("#ask").click()
    shown = page.message("the text box is empty")
    assert "vqa: the text box is empty; type a question about the image" in shown and "Traceback" not in shown
    assert page.answer() == ""
