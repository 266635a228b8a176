"""Label Studio ML backend under `/label-studio`: the routes of HumanSignal's `label-studio-ml-backend`.

Label Studio is given `http://host:8000/label-studio` as a model's URL and calls `GET /health`,
`POST /setup`, `POST /predict` and `POST /webhook` below it. `/predict` reads the project's labeling
config: its `<RectangleLabels>` control on an `<Image>`. Each `<Label>` is a phrase for Kosmos-2's
detection task (one grounded prompt per phrase, one batch per image); a label's `predicted_values`
(comma-separated) or `hint` replaces its value as the phrase, and a `<TextArea>` on the same image,
when an annotator has typed in it (interactive pre-annotation), replaces the labels' phrases with its
own lines. Each box comes back as a `rectanglelabels` region in percent of the image, with the box's score;
with a `<BrushLabels>` or `<PolygonLabels>` control instead, the engine is asked for masks (its segmenter,
`serve --segmenter`) and each box comes back as its mask, a `brushlabels` or `polygonlabels` region;
boxes scored under the threshold are left out: the value of a `<Number name="min_score">` control when the
config has one (the annotator's, else its `defaultValue`), else the service's default (KOSMOS_MIN_SCORE).

A Kosmos-2.5 model reads pages instead (its tasks include `ocr`): the config is Label Studio's OCR template, a
`<Labels>` (or `<RectangleLabels>`) on the `<Image>` and a per-region `<TextArea>`, and each line the page reads is
a `rectanglelabels` region with the config's line label (LINE_LABEL when it has it, else its first) and a `textarea`
region of the same id with the line's text, both with the line's score, as the export builds them
(`exports.label_studio.line_regions`); lines scored under the threshold are left out (a Kosmos-2.5's default
keeps every line). A config the loaded model cannot fill (no per-region `<TextArea>` on a
Kosmos-2.5; the OCR template on a Kosmos-2) is a 422, and `/setup` and `/predict` answer 503 until the model is
loaded, since its family decides how the config is read.

Images in task data: `data:` URIs, Label Studio uploads (`/data/upload/...`) and local-files URLs
(`/data/local-files/?d=...`), read from `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT` when there and
otherwise fetched from `LABEL_STUDIO_URL` with `LABEL_STUDIO_API_KEY`. No other host is ever fetched.

Errors come in the ML backend's own shape, `{"status": ..., "detail": ...}` (plus the service's
`code`), with the service's status codes.

`config.py` reads the labeling config, `images.py` the task images, `protocol.py` is the wire format
(the bodies, the predictions, the error body) and `routes.py` the routes.
"""

from kosmos_serve.server.label_studio.protocol import ERROR_FORMAT
from kosmos_serve.server.label_studio.routes import router

__all__ = ["ERROR_FORMAT", "router"]
