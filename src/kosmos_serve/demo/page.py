"""The Gradio page: an image, a task and its inputs in; the grounded image, coloured text, raw text and JSON out.

Every model call goes through the service's batcher, so the page shares the loaded model (and its batches)
with the HTTP API. Domain errors show as the page's error message; nothing else of an error reaches it.
The Run button is the page's one Gradio API endpoint, `/predict` (what `gradio_client` lists and calls);
the page's own UI events (task fields, sampling sliders, box corners) are private.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from gradio.utils import get_upload_folder

from kosmos_serve.demo.display import highlighted_html, save_png
from kosmos_serve.demo.form import BOX_EXAMPLE, TASK_FIELDS, add_corner, generation_params, task_input
from kosmos_serve.drawing import draw_result
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
API_NAME = "predict"  # the page's one API endpoint, /predict: an image and a task in, the result out
API_DESCRIPTION = (
    "Runs a task on an image, as the page's Run button does: returns the image with the grounded boxes drawn, "
    "the text as HTML with each entity coloured, a PNG of that image, the raw generation, and the result as JSON "
    "(task, text, entities, raw_text...). Only the inputs the task reads are used; an empty max_new_tokens means "
    "the service's default."
)
CSS = ".kosmos-text { font-size: 1.15em; line-height: 1.9; } .kosmos-entities { list-style: none; padding: 0; }"


def mount_page(app: FastAPI, state: ServiceState, path: str, examples: Sequence[Path]) -> None:
    """Serve the page at `path` of `app`, on the model of `state`."""
    page = build_page(state, examples)
    gr.mount_gradio_app(
        app, page, path=path, allowed_paths=[str(example) for example in examples],
        max_file_size=state.settings.max_upload_bytes, show_error=False, ssr_mode=False, run_history=False, css=CSS,
    )
    # Gradio checks that an input file was uploaded (not any path a caller names) only once its Blocks count as
    # launched, which `launch()` marks and `mount_gradio_app` (gradio 6.31) does not: mark it, or a caller of the
    # page's API could have gradio copy any file of this server into its cache and the page would draw it.
    page.has_launched = True


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
                # Hidden until a task reads them (then `_show_fields` relabels them); empty by default, so an API
                # client sends only what its task reads.
                prompt = gr.Textbox("", visible=False, label="Prompt or question", elem_id="prompt")
                phrases = gr.Textbox("", visible=False, lines=2, label="Phrases (one per line)", elem_id="phrases")
                boxes = gr.Textbox("", visible=False, lines=2, label="Boxes (x1,y1,x2,y2 in pixels, one per line)",
                                   placeholder=BOX_EXAMPLE, elem_id="boxes")
                grounding = gr.Checkbox(True, visible=False, label="Grounding (<grounding> goes first)",
                                        elem_id="grounding")
                with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                    sample = gr.Checkbox(False, label="Sample (top-p) instead of greedy decoding", elem_id="sample")
                    top_p = gr.Slider(0, 1, value=0.9, step=0.05, label="Top-p", visible=False)
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", visible=False)
                    max_new_tokens = _max_new_tokens_input(state.engine_settings.max_new_tokens)
                # Shown when the service has a segmenter (--segmenter): a translucent mask over each box's object.
                masks = gr.Checkbox(False, visible=state.engine_settings.segmenter is not None,
                                    label="Masks (the segmenter's, over each box)", elem_id="masks")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column():
                annotated = gr.Image(type="pil", format="png", label="Grounded image", interactive=False,
                                     height=320, buttons=["download", "fullscreen"], elem_id="annotated")
                text = gr.HTML(label="Grounded text (HTML)", elem_id="text")
                download = gr.DownloadButton("Download the annotated image (PNG)", visible=False, size="md",
                                             elem_id="download")
                raw = gr.Textbox(label="Raw generation", lines=3, max_lines=6, buttons=["copy"], elem_id="raw")
                with gr.Accordion("Result (JSON)", open=False, elem_id="result"):
                    result_json = gr.JSON(label="Result (JSON)", show_label=False, elem_id="result-json")
        pending_corner = gr.State(None)

        # The page's own behaviour: private, so neither the API page nor gradio_client lists or calls them.
        task.change(_show_fields, task, [hint, prompt, phrases, boxes, grounding], api_visibility="private")
        sample.change(_show_sampling, sample, [top_p, temperature], api_visibility="private")
        image.change(_forget_corner, None, pending_corner, api_visibility="private")
        image.select(_pick_corner, [boxes, pending_corner], [boxes, pending_corner], api_visibility="private")

        # The API's parameters are named after these arguments.
        async def answer(image, task, prompt, phrases, boxes, grounding, sample, top_p, temperature,
                         max_new_tokens=None, masks=False):
            try:
                request = Request(
                    await _load(state, image, examples),
                    task_input(task, prompt, phrases, boxes, grounding),
                    generation_params(sample, top_p, temperature, max_new_tokens, masks),
                )
                result = await state.generate(request)
            except KosmosServeError as error:
                raise gr.Error(error.naming(), print_exception=False) from None
            drawn = await asyncio.to_thread(draw_result, request.image, result)
            png = await asyncio.to_thread(save_png, drawn, DOWNLOADS, f"kosmos2-{result.task.value}")
            return drawn, highlighted_html(result), png, result.raw_text, result.to_dict()

        run.click(
            answer, [image, task, prompt, phrases, boxes, grounding, sample, top_p, temperature, max_new_tokens, masks],
            [annotated, text, download, raw, result_json],
            preprocess=False,  # the image comes as its uploaded file, unopened: the service's decoder judges it
            concurrency_limit=None,  # the batcher queues and limits
            api_name=API_NAME, api_description=API_DESCRIPTION,
        ).success(  # the page shows the download button once there is an image; the API returns just the file
            _show, None, download, queue=False, show_progress="hidden", api_visibility="private",
        )
    return page


def _max_new_tokens_input(default: int | None) -> gr.Number:
    """The token count, starting at the service's setting; empty (None) asks for the service's default."""
    if default is None:  # unset: the model's own default, else 128, resolved by the engine
        label = "Maximum new tokens (empty: the model's default)"
    else:
        label = f"Maximum new tokens (empty: {default})"
    return gr.Number(default, precision=0, label=label, elem_id="max-new-tokens")


def _show():
    return gr.update(visible=True)


def _show_sampling(on: bool):
    return gr.update(visible=on), gr.update(visible=on)


def _forget_corner():
    return None


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


async def _load(state: ServiceState, upload: dict | None, examples: Sequence[Path]):
    """The uploaded image (gradio's file record), decoded by the service's own loader.

    Only a file gradio received (its upload folder) or one of the page's examples is read: a caller
    of the page's API names the path itself, and no other file of the server may be opened.
    """
    if upload is None or not isinstance(upload, dict) or not isinstance(upload.get("path"), str):
        raise InvalidImageError("Upload an image or pick an example first.")
    path = Path(upload["path"]).resolve()
    if not (path.is_relative_to(Path(get_upload_folder()).resolve()) or path in {e.resolve() for e in examples}):
        raise InvalidImageError("Upload the image through the page: only uploaded files and the examples are read.")
    return await asyncio.to_thread(load_image, path, max_pixels=state.engine_settings.max_image_pixels)
