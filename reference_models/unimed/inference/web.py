"""``cmoe unimed serve``: a local web page to ask a trained model about an image (Gradio, the ``cmoe[demo]`` extra).

Upload an image or pick one of the synthetic example scans (`examples`), choose the task, type the question (the
object for REC, the box for REG) and press *Ask*: the page shows the answer as `UniMedPredictor.ask` gives it, the
image with the box drawn for REC/REG, and a bar chart of the connector's expert weights for this image; its header
names the checkpoint, step and prompt setting. Bad input shows one message (the `CMoEError` text), never a
traceback. The same functions are the app's HTTP API (``/ask``, ``/pick_example``), which `gradio_client` drives.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from cmoe.errors import CMoEError
from cmoe.extras import require
from cmoe.reference_models.unimed.boxes import parse_box, parse_pixel_box
from cmoe.reference_models.unimed.inference.examples import examples
from cmoe.reference_models.unimed.inference.predictor import Answer, Request, UniMedPredictor
from cmoe.reference_models.unimed.tasks import TASKS

if TYPE_CHECKING:
    import gradio

TASK_CHOICES = [("VQA: a question about the image", "vqa"), ("Report: describe the image", "report"),
                ("REC: locate an object", "rec"), ("REG: name what is in a box", "reg"),
                ("Classification", "cls"), ("QA: a text-only question", "qa")]
"""The tasks the page offers, as (label, task) pairs."""
TEXT_HINT = {"qa": "a medical question, e.g. what does the liver do?",
             "vqa": "a question about the image, e.g. is there a lesion in the heart?",
             "report": "optional: the instruction (default: describe the image)",
             "rec": "the object to locate, e.g. liver",
             "reg": "a box: pixel corners x1,y1,x2,y2 (e.g. 4,8,20,24) or {<x1><y1><x2><y2>} on the 0-100 grid",
             "cls": "optional: the question listing the classes (default: the modality question)"}
"""What the text box asks for, per task (its placeholder)."""
DISPLAY_SIZE = 256
"""Drawn images are enlarged (nearest neighbour) to about this many pixels so that the box shows crisply."""
CSS = ("#image img, #drawn img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }\n"
       "#drawn img { padding-top: 32px; box-sizing: border-box; }")
"""Small scans fill the image boxes, their pixels kept sharp (what the model sees is a few dozen pixels wide); the
drawn image starts below its label, which would hide a box along the top edge."""


def page_request(image: np.ndarray | None, task: str, text: str | None) -> Request:
    """The `Request` the page's inputs make, with one `CMoEError` in the page's words for what is missing: a task
    that needs an image and has none, an empty question or object, a REG box that is not a box. A REG text of four
    numbers is a box in pixels of the image; ``{<x1><y1><x2><y2>}`` is one on the model's 0–100 grid."""
    if task not in TASKS:
        raise CMoEError(f"task: expected one of {', '.join(name for _, name in TASK_CHOICES)}, got {task!r}")
    text = (text or "").strip()
    if TASKS[task].has_image and image is None:
        raise CMoEError(f"image: {task} needs an image; upload one or pick an example image")
    if not text and task in ("qa", "vqa", "rec", "reg"):
        raise CMoEError(f"{task}: the text box is empty; type {TEXT_HINT[task]}")
    box = None
    if task == "reg" and parse_box(text) is None:
        box = parse_pixel_box(text)
        if box is None:
            raise CMoEError(f"reg: {text!r} is not a box; type {TEXT_HINT['reg']}")
        text = ""
    image = None if not TASKS[task].has_image else np.asarray(image)
    return Request(task, image, text or None, box)


def drawn_image(request: Request, answer: Answer) -> Any:
    """For REC the answer's box, for REG the asked box, drawn on the image enlarged for display (None otherwise)."""
    from PIL import Image

    from cmoe.reference_models.unimed.inference.command import box_to_draw
    from cmoe.reference_models.unimed.inference.drawing import draw_box
    from cmoe.reference_models.unimed.inference.predictor import image_array

    box = box_to_draw(request, answer)
    if box is None:
        return None
    picture = Image.fromarray(image_array(request.image))
    scale = max(1, DISPLAY_SIZE // max(picture.size))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return draw_box(np.asarray(picture), [v * scale for v in box])


def expert_table(routing: list[float] | None) -> Any:
    """The routing weights as the bar chart's table, one row per expert; None (an empty chart) for a text-only
    task or an MLP connector, which route nothing."""
    import pandas as pd

    if not routing:
        return None  # not an empty table: the chart would not draw the tables that follow it
    return pd.DataFrame({"expert": [f"expert {i}" for i in range(len(routing))], "weight": routing})


def _readable(preprocess: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An image input's `preprocess` whose unreadable upload is one clear message instead of Gradio's bare "Error".
    Wrapped on the instance: a subclass of a Gradio component would make Gradio write a ``.pyi`` file next to this
    module."""
    import gradio as gr

    def read(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception as error:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"image: {name} cannot be read as an image ({type(error).__name__}); upload a PNG or "
                           "JPEG file, or pick an example image", duration=None, print_exception=False) from None

    return read


def build_app(predictor: UniMedPredictor) -> gradio.Blocks:
    """The demo page for `predictor` as a ``gradio.Blocks``, not started: `serve` starts it (or call
    ``launch(css=CSS)``)."""
    require("demo", "the Uni-Med web demo")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    import gradio as gr

    shipped = {example.name: example for example in examples()}

    def ask(image: np.ndarray | None, task: str, text: str | None) -> tuple[str, Any, Any]:
        try:
            request = page_request(image, task, text)
            answer = predictor.ask_batch([request])[0]
        except CMoEError as error:
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        return answer.answer, drawn_image(request, answer), expert_table(answer.routing)

    def pick_example(name: str | None, task: str) -> tuple[Any, Any]:
        if name is None:
            return gr.update(), gr.update()
        if name not in shipped:
            raise gr.Error(f"example: expected one of {', '.join(shipped)}, got {name!r}", print_exception=False)
        example = shipped[name]
        return example.image, example.texts.get(task, "")

    def change_task(name: str | None, task: str) -> Any:
        hint = TEXT_HINT.get(task, "")
        if name in shipped:
            return gr.update(value=shipped[name].texts.get(task, ""), placeholder=hint)
        return gr.update(placeholder=hint)

    with gr.Blocks(title="Uni-Med demo", analytics_enabled=False) as app:
        gr.Markdown("## Uni-Med: ask a trained model about a scan")
        gr.Markdown(f"Model: `{predictor.describe()}`", elem_id="model-info")
        with gr.Row():
            with gr.Column():
                example = gr.Dropdown([name for name in shipped], value=None, label="Example image",
                                      info="synthetic test scans the model was not trained on", elem_id="example")
                image = gr.Image(type="numpy", format="png", image_mode="RGB", sources=["upload"],
                                 label="Image (or upload your own)", height=DISPLAY_SIZE, elem_id="image")
                image.preprocess = _readable(image.preprocess)
                task = gr.Radio(TASK_CHOICES, value="vqa", label="Task", elem_id="task")
                text = gr.Textbox(label="Question, object or box", placeholder=TEXT_HINT["vqa"], elem_id="text")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                drawn = gr.Image(label="Box (REC: the answer's, REG: the one asked about)", format="png",
                                 interactive=False, height=DISPLAY_SIZE, elem_id="drawn")
                experts = gr.BarPlot(None, x="expert", y="weight", y_lim=[0, 1],
                                     label="Expert weights for this image (mean over its visual tokens)",
                                     elem_id="experts")
        example.input(pick_example, [example, task], [image, text], api_name="pick_example")
        image.upload(lambda: None, None, example, api_visibility="private")
        task.input(change_task, [example, task], text, api_visibility="private")
        button.click(ask, [image, task, text], [answer, drawn, experts], api_name="ask")
        text.submit(ask, [image, task, text], [answer, drawn, experts], api_visibility="private")
    return app


def check_port(port: int) -> None:
    """One `CMoEError` for a port number no server can listen on."""
    if not 0 <= port <= 65535:
        raise CMoEError(f"--port: expected 0 (a free port) or 1-65535, got {port}")


def free_port(host: str) -> int:
    """A port nobody listens on at `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def serve(predictor: UniMedPredictor, host: str = "127.0.0.1", port: int = 0,
          announce: Callable[[str], None] | None = None) -> None:
    """Serve the demo page for `predictor` at ``http://host:port`` (`port` 0: a free one) until interrupted or
    terminated; `announce` gets the line ``serving on URL`` once the page answers (default: printed to stdout)."""
    check_port(port)
    app = build_app(predictor)
    port = port or free_port(host)
    app.queue(default_concurrency_limit=1)  # one question at a time: the model is not shared across threads
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                   ssr_mode=False, show_error=False, css=CSS)
    except OSError:  # Gradio's words name its own settings; ours name the command's
        raise CMoEError(f"--port: cannot listen on {host}:{port} (in use, or --host is not an address of this "
                        "machine); pass another --port, or 0 for a free one") from None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    (announce or (lambda line: print(line, flush=True)))(f"serving on {url}")
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main else None
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        app.close(verbose=False)
        if main:
            signal.signal(signal.SIGTERM, previous)
        print("stopped", file=sys.stderr, flush=True)
