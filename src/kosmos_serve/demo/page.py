"""The Gradio page: an image, a task and its inputs in; the grounded image, coloured text, raw text and JSON out.

Every model call goes through the service's batcher, so the page shares the loaded model (and its batches)
with the HTTP API. Domain errors show as the page's error message; nothing else of an error reaches it.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from kosmos_serve.demo.display import highlighted_html, save_png
from kosmos_serve.demo.form import BOX_EXAMPLE, TASK_FIELDS, add_corner, generation_params, task_input
from kosmos_serve.drawing import draw_entities
from kosmos_serve.engine import Request
from kosmos_serve.errors import InvalidImageError, KosmosServeError
from kosmos_serve.images import load_image
from kosmos_serve.server.state import ServiceState
from kosmos_serve.tasks import Task

TITLE = "Kosmos-2: grounded image understanding"
INTRO = (
    f"# {TITLE}\n"
    "Upload an image (or pick an example), choose a task and run it. Each phrase the model grounds is drawn "
    "on the image and marked in the text in the same colour. Boxes are pixels `x1,y1,x2,y2`, one per line; "
    "clicking two opposite corners on the image adds one."
)
DOWNLOADS = Path(tempfile.gettempdir()) / "kosmos-demo"  # annotated PNGs, named by content, the newest kept
CSS = ".kosmos-text { font-size: 1.15em; line-height: 1.9; } .kosmos-entities { list-style: none; padding: 0; }"


def mount_page(app: FastAPI, state: ServiceState, path: str, examples: Sequence[Path]) -> None:
    """Serve the page at `path` of `app`, on the model of `state`."""
    gr.mount_gradio_app(
        app, build_page(state, examples), path=path, allowed_paths=[str(example) for example in examples],
        max_file_size=state.settings.max_upload_bytes, show_error=False, ssr_mode=False, run_history=False, css=CSS,
    )


def build_page(state: ServiceState, examples: Sequence[Path]) -> gr.Blocks:
    """The page's layout and events."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image", height=320,
                                 elem_id="image")
                if examples:
                    gr.Examples([[str(example)] for example in examples], inputs=[image], label="Examples")
                task = gr.Dropdown([t.value for t in Task], value=Task.CAPTION.value, label="Task", elem_id="task")
                hint = gr.Markdown(TASK_FIELDS[Task.CAPTION].hint, elem_id="task-hint")
                prompt = gr.Textbox(visible=False, elem_id="prompt")
                phrases = gr.Textbox(visible=False, lines=2, elem_id="phrases")
                boxes = gr.Textbox(visible=False, lines=2, label="Boxes (x1,y1,x2,y2 in pixels, one per line)",
                                   placeholder=BOX_EXAMPLE, elem_id="boxes")
                grounding = gr.Checkbox(True, visible=False, label="Grounding (<grounding> goes first)",
                                        elem_id="grounding")
                with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                    sample = gr.Checkbox(False, label="Sample (top-p) instead of greedy decoding", elem_id="sample")
                    top_p = gr.Slider(0, 1, value=0.9, step=0.05, label="Top-p", visible=False)
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", visible=False)
                    max_new_tokens = gr.Number(state.engine_settings.max_new_tokens, precision=0,
                                               label="Maximum new tokens", elem_id="max-new-tokens")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                annotated = gr.Image(type="pil", format="png", label="Grounded image", interactive=False,
                                     height=320, buttons=["download", "fullscreen"], elem_id="annotated")
                text = gr.HTML(label="Text", elem_id="text")
                download = gr.DownloadButton("Download the annotated image (PNG)", visible=False, size="md",
                                             elem_id="download")
                raw = gr.Textbox(label="Raw generation", lines=3, max_lines=6, buttons=["copy"], elem_id="raw")
                with gr.Accordion("Result (JSON)", open=False, elem_id="result"):
                    result_json = gr.JSON(show_label=False, elem_id="result-json")
        pending_corner = gr.State(None)

        task.change(_show_fields, task, [hint, prompt, phrases, boxes, grounding])
        sample.change(lambda on: (gr.update(visible=on), gr.update(visible=on)), sample, [top_p, temperature])
        image.change(lambda: None, None, pending_corner)
        image.select(_pick_corner, [boxes, pending_corner], [boxes, pending_corner])

        async def answer(image, task, prompt, phrases, boxes, grounding, sample, top_p, temperature,
                         max_new_tokens):
            try:
                request = Request(
                    await _load(state, image),
                    task_input(task, prompt, phrases, boxes, grounding),
                    generation_params(sample, top_p, temperature, max_new_tokens),
                )
                result = await state.generate(request)
            except KosmosServeError as error:
                raise gr.Error(error.message, print_exception=False) from None
            drawn = await asyncio.to_thread(draw_entities, request.image, result.entities)
            png = await asyncio.to_thread(save_png, drawn, DOWNLOADS, f"kosmos2-{result.task.value}")
            return drawn, highlighted_html(result), gr.update(value=png, visible=True), result.raw_text, result.to_dict()

        run.click(
            answer, [image, task, prompt, phrases, boxes, grounding, sample, top_p, temperature, max_new_tokens],
            [annotated, text, download, raw, result_json],
            preprocess=False,  # the image comes as its uploaded file, unopened: the service's decoder judges it
            concurrency_limit=None,  # the batcher queues and limits
        )
    return page


def _show_fields(task: str):
    fields = TASK_FIELDS[Task(task)]

    def text_input(field):
        if field is None:
            return gr.update(visible=False)
        return gr.update(visible=True, label=field.label, placeholder=field.example)

    return (fields.hint, text_input(fields.prompt), text_input(fields.phrases), gr.update(visible=fields.boxes),
            gr.update(visible=fields.grounding))


def _pick_corner(boxes: str, pending, selected: gr.SelectData):
    x, y = selected.index
    boxes, pending = add_corner(boxes, pending, (round(x), round(y)))
    if pending is not None:
        gr.Info(f"Corner {pending[0]},{pending[1]} picked: click the opposite corner.")
    return boxes, pending


async def _load(state: ServiceState, upload: dict | None):
    """The uploaded image (gradio's file record), decoded by the service's own loader."""
    if upload is None:
        raise InvalidImageError("Upload an image or pick an example first.")
    return await asyncio.to_thread(load_image, upload["path"], max_pixels=state.engine_settings.max_image_pixels)
