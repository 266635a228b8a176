"""Supervisely's served-model protocol under `/supervisely`, for the `supervisely` SDK's `SessionJSON`.

    session = sly.nn.inference.SessionJSON(sly.Api("http://localhost", "unused"),
                                           session_url="http://127.0.0.1:8000/supervisely")
    session.inference_image_path("scene.png")  # -> {"annotation": {...}, "data": {...}, ...}

The model serves as a *prompt-based object detector*, as supervisely-ecosystem/serve-kosmos-2 does:
`text_prompt` is a Kosmos-2 prompt (`<grounding>` is put in front when missing, as serve-kosmos-2
does, since without it Kosmos-2 draws no boxes), and every box of every grounded phrase of the
answer becomes one `rectangle` object whose class is the phrase and whose "confidence" tag is the box's
score (declared in the model meta, as the SDK's detectors do); boxes scored under `min_score` (a setting;
unset: the service's default, KOSMOS_MIN_SCORE) are left out. With the setting `masks: true` (the
service needs a segmenter, `serve --segmenter`) each object is a `bitmap` instead: its box's mask,
cropped, with its origin, as `sly.Bitmap` writes it. `classes` in the settings (the one key SessionJSON
allows besides the defaults) keeps only the objects whose phrase it lists, as the SDK's
`Inference._predictions_to_annotation` does with it; `"all"` or none keeps every object.

Wire shapes follow the SDK (supervisely/supervisely, release 6.74.51): the routes and their
payloads of `Inference.serve` and its error handler (`supervisely/nn/inference/inference.py`),
what the client sends (`supervisely/nn/inference/session.py`), a prediction
(`supervisely/nn/model/prediction.py`, `Prediction.to_json`, plus the `data` that
`Inference._format_output` adds), a rectangle label (`supervisely/annotation/label.py`,
`Label.to_json`) and a bitmap's geometry (`supervisely/geometry/bitmap.py`). The settings and their
defaults are serve-kosmos-2's `src/inference_settings.yaml`, plus `min_score` and `masks`.

Every request goes through the service's batcher, limits, image decoding, API key and metrics, like
the other routes. Errors answer as Supervisely's servers do, `{"detail", "success": false,
"message"}`; routes that take Supervisely ids (images, videos, projects) need the platform and
answer 400 saying so.
"""

from kosmos_serve.server.supervisely.protocol import ERROR_FORMAT
from kosmos_serve.server.supervisely.routes import router

__all__ = ["ERROR_FORMAT", "router"]
