"""A corpus of bad, hostile and unusual inputs sent to every image route of the real service.

Each case is its own test. Whatever the input, the answer is a 2xx with a valid result or a 4xx
with the one error shape `{"error": {"code", "message"}}`, never a 5xx, never internal text (a
traceback, a Python class repr); where the README documents the answer (400 `invalid_image`, 413
`image_too_large`, 422 `invalid_request`...) the case asserts exactly that. After each case the
process is alive and `GET /health` answers; at the end a valid request on every route still succeeds.
"""

from __future__ import annotations

import base64
import json
import select
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from . import bad_images
from .support import MAX_NEW_TOKENS_CAP, MAX_PROMPT_CHARS, MAX_UPLOAD_BYTES, assert_answer_ok, assert_error_shape

NEW_TOKENS = 4
TOO_LONG = "why " * (MAX_PROMPT_CHARS // 4) + "?"  # one character over KOSMOS_MAX_PROMPT_CHARS
assert len(TOO_LONG) == MAX_PROMPT_CHARS + 1
TAGGED_PHRASE = "<phrase> a red circle</phrase><object><patch_index_0001><patch_index_1000></object>"
PNG, _ = bad_images.valid_png()
PNG_B64 = base64.b64encode(PNG).decode()
BOUNDARY = "reliability-boundary-7f3a"

INVALID_IMAGE = ((400,), ("invalid_image",))
TOO_LARGE_IMAGE = ((413,), ("image_too_large",))
TOO_LARGE_BODY = ((413,), ("payload_too_large",))
INVALID_REQUEST = ((422,), ("invalid_request",))
INVALID_BOX = ((422,), ("invalid_box", "invalid_request"))
OK = ((200,), None)
OK_OR_INVALID_IMAGE = ((200, 400), ("invalid_image",))
OK_OR_INVALID_REQUEST = ((200, 422), ("invalid_request",))
ANY_CLIENT_ERROR = (None, None)  # any 4xx with the error shape (or a 2xx with a valid result)


@dataclass(frozen=True)
class Case:
    """One request and what its answer may be: `statuses` (None: any 2xx/4xx) and error `codes` (None: any)."""

    id: str
    path: str
    request: Callable[[], dict]  # keyword arguments of httpx.post, built when the test runs
    expect: tuple[tuple[int, ...] | None, tuple[str, ...] | None]
    image_size: tuple[int, int] | None = None  # the `image_size` a 200 of /v1 must report


# ---------------------------------------------------------------- how each route takes an image


def predict(image: bytes, mime: str = "image/png", **fields) -> Callable[[], dict]:
    return lambda: {"files": {"content": ("image", image, mime)}, "data": fields}


def generate_json(image: str | bytes, **fields) -> Callable[[], dict]:
    encoded = base64.b64encode(image).decode() if isinstance(image, bytes) else image
    return lambda: {"json": {"image": encoded, "max_new_tokens": NEW_TOKENS, **fields}}


def generate_raw_json(text: str | bytes) -> Callable[[], dict]:
    """A JSON body written by hand (raw `Infinity`, `NaN`, cut-off or non-UTF-8 text)."""
    body = text.encode() if isinstance(text, str) else text
    return lambda: {"content": body, "headers": {"Content-Type": "application/json"}}


def form_value(value) -> str | list[str]:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return [form_value(item) for item in value]
    return str(value)


def generate_upload(image: bytes, mime: str = "image/png", **fields) -> Callable[[], dict]:
    data = {"max_new_tokens": NEW_TOKENS, **fields}
    return lambda: {"files": {"image": ("image", image, mime)},
                    "data": {name: form_value(value) for name, value in data.items()}}


def chunked_multipart(field: str, size: int) -> Callable[[], dict]:
    """A multipart body of `size` bytes in `field`, sent chunked (a generator: no Content-Length)."""

    def chunks() -> Iterator[bytes]:
        yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="big.png"\r\n'
               "Content-Type: image/png\r\n\r\n").encode()
        sent = 0
        while sent < size:
            piece = min(64 * 1024, size - sent)
            yield b"\0" * piece
            sent += piece
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    return lambda: {"content": chunks(), "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}


def chunked_json(size: int) -> Callable[[], dict]:
    def chunks() -> Iterator[bytes]:
        yield b'{"image": "'
        sent = 0
        while sent < size:
            piece = min(64 * 1024, size - sent)
            yield b"A" * piece
            sent += piece
        yield b'"}'

    return lambda: {"content": chunks(), "headers": {"Content-Type": "application/json"}}


# ---------------------------------------------------------------- image files, on each of the three routes

IMAGES = [
    # (name, builder, expected answer, size as a viewer sees it when it is decodable)
    ("undecodable-bytes", bad_images.undecodable, INVALID_IMAGE, None),
    ("png-signature-then-garbage", bad_images.png_signature_then_garbage, INVALID_IMAGE, None),
    ("zero-byte-file", bad_images.zero_bytes, INVALID_IMAGE, None),
    ("truncated-png", bad_images.truncated_png, INVALID_IMAGE, None),
    ("truncated-jpeg", bad_images.truncated_jpeg, INVALID_IMAGE, None),
    ("png-bomb-50000x50000-by-header", bad_images.png_bomb_50000, TOO_LARGE_IMAGE, None),
    ("png-10000x5000-over-pixel-cap", bad_images.png_over_pixel_cap, TOO_LARGE_IMAGE, None),
    ("jpeg-bomb-65000x65000-by-header", bad_images.jpeg_bomb, TOO_LARGE_IMAGE, None),
    ("png-16-bit-grey", bad_images.png_16_bit, OK, (64, 48)),
    ("cmyk-jpeg", bad_images.cmyk_jpeg, OK, (96, 72)),
    ("palette-png-with-transparency", bad_images.palette_png_with_transparency, OK, (96, 72)),
    ("animated-gif", bad_images.animated_gif, OK, (96, 72)),
    ("png-1x4000", bad_images.one_by_4000, OK, (1, 4000)),
    ("png-4000x1", bad_images.four_thousand_by_one, OK, (4000, 1)),
    ("webp", bad_images.webp, OK, (96, 72)),
    ("tiff-32-bit-float-out-of-range", bad_images.tiff_float, OK, (64, 48)),
    ("jpeg-exif-orientation-9", bad_images.jpeg_with_bad_orientation, OK_OR_INVALID_IMAGE, None),
    ("jpeg-exif-orientation-as-text", bad_images.jpeg_with_text_orientation, OK_OR_INVALID_IMAGE, None),
    ("jpeg-exif-garbage", bad_images.jpeg_with_garbage_exif, OK_OR_INVALID_IMAGE, None),
]


def image_cases() -> list[Case]:
    cases = []
    for name, build, expect, size in IMAGES:
        data, mime = build()
        cases += [
            Case(f"predict-{name}", "/predict", predict(data, mime), expect, size),
            Case(f"json-{name}", "/v1/generate", generate_json(data), expect, size),
            Case(f"upload-{name}", "/v1/generate/upload", generate_upload(data, mime), expect, size),
        ]
    return cases


# ---------------------------------------------------------------- bodies and fields, route by route

JSON_CASES = [
    Case("json-image-bad-base64", "/v1/generate", generate_json("not base64 at all!!"), INVALID_IMAGE),
    Case("json-image-base64-of-text", "/v1/generate", generate_json(b"plain text, not an image"), INVALID_IMAGE),
    Case("json-image-data-url", "/v1/generate", generate_json(f"data:image/png;base64,{PNG_B64}"), OK, (96, 72)),
    Case("json-image-data-url-bad-base64", "/v1/generate", generate_json("data:image/png;base64,@@@@"), INVALID_IMAGE),
    Case("json-image-http-url", "/v1/generate", generate_json("http://127.0.0.1:9/cat.png"), INVALID_IMAGE),
    Case("json-image-file-url", "/v1/generate", generate_json("file:///etc/passwd"), INVALID_IMAGE),
    Case("json-image-null", "/v1/generate", generate_json(None), INVALID_REQUEST),  # type: ignore[arg-type]
    Case("json-image-missing", "/v1/generate", lambda: {"json": {"task": "caption"}}, INVALID_REQUEST),
    Case("json-body-cut-off", "/v1/generate", generate_raw_json('{"image": "' + PNG_B64[:20]), INVALID_REQUEST),
    Case("json-body-not-utf8", "/v1/generate", generate_raw_json(b'{"image": "\xff\xfe\xfa"}'), ((400, 422), None)),
    Case("json-body-empty", "/v1/generate", generate_raw_json(b""), INVALID_REQUEST),
    Case("json-body-is-a-list", "/v1/generate", generate_raw_json("[1, 2, 3]"), INVALID_REQUEST),
    Case("json-body-nested-100000-deep", "/v1/generate", generate_raw_json("[" * 100_000 + "]" * 100_000),
         ((400, 413, 422), None)),
    Case("json-body-as-text-plain", "/v1/generate",
         lambda: {"content": json.dumps({"image": PNG_B64}), "headers": {"Content-Type": "text/plain"}},
         ANY_CLIENT_ERROR),
    Case("json-unknown-field", "/v1/generate", generate_json(PNG, colour="red"), INVALID_REQUEST),
    Case("json-unknown-task", "/v1/generate", generate_json(PNG, task="teleport"), INVALID_REQUEST),
    Case("json-task-as-list", "/v1/generate", generate_json(PNG, task=["caption"]), INVALID_REQUEST),
    Case("json-phrases-as-string", "/v1/generate", generate_json(PNG, task="phrase_grounding", phrases="a circle"),
         INVALID_REQUEST),
    Case("json-phrases-not-strings", "/v1/generate", generate_json(PNG, task="detection", phrases=[1, None]),
         INVALID_REQUEST),
    Case("json-detection-without-phrases", "/v1/generate", generate_json(PNG, task="detection"), INVALID_REQUEST),
    Case("json-max-new-tokens-as-word", "/v1/generate", generate_json(PNG, max_new_tokens="four"), INVALID_REQUEST),
    Case("json-max-new-tokens-fractional", "/v1/generate", generate_json(PNG, max_new_tokens=4.5), INVALID_REQUEST),
    Case("json-max-new-tokens-negative", "/v1/generate", generate_json(PNG, max_new_tokens=-5), INVALID_REQUEST),
    Case("json-max-new-tokens-zero", "/v1/generate", generate_json(PNG, max_new_tokens=0), INVALID_REQUEST),
    Case("json-max-new-tokens-over-cap", "/v1/generate", generate_json(PNG, max_new_tokens=MAX_NEW_TOKENS_CAP + 1),
         INVALID_REQUEST),
    Case("json-max-new-tokens-10e30", "/v1/generate", generate_json(PNG, max_new_tokens=10**30), INVALID_REQUEST),
    Case("json-do-sample-as-word", "/v1/generate", generate_json(PNG, do_sample="maybe"), INVALID_REQUEST),
    Case("json-temperature-raw-infinity", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "do_sample": true, "temperature": Infinity, "max_new_tokens": 4}}'), INVALID_REQUEST),
    Case("json-temperature-raw-nan", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "do_sample": true, "temperature": NaN, "max_new_tokens": 4}}'), INVALID_REQUEST),
    Case("json-top-p-raw-nan", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "do_sample": true, "top_p": NaN, "max_new_tokens": 4}}'), INVALID_REQUEST),
    Case("json-temperature-raw-minus-infinity-greedy", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "temperature": -Infinity, "max_new_tokens": 4}}'), INVALID_REQUEST),
    Case("json-temperature-1e-300-sampling", "/v1/generate",
         generate_json(PNG, do_sample=True, temperature=1e-300, seed=1), INVALID_REQUEST),
    Case("json-temperature-zero-sampling", "/v1/generate", generate_json(PNG, do_sample=True, temperature=0),
         INVALID_REQUEST),
    Case("json-seed-2-to-the-64-sampling", "/v1/generate", generate_json(PNG, do_sample=True, seed=2**64),
         INVALID_REQUEST),
    Case("json-seed-2-to-the-53-sampling", "/v1/generate", generate_json(PNG, do_sample=True, seed=2**53),
         INVALID_REQUEST),
    Case("json-seed-negative-sampling", "/v1/generate", generate_json(PNG, do_sample=True, seed=-1),
         INVALID_REQUEST),
    Case("json-temperature-101-sampling", "/v1/generate", generate_json(PNG, do_sample=True, temperature=101),
         INVALID_REQUEST),
    Case("json-no-repeat-ngram-65", "/v1/generate", generate_json(PNG, no_repeat_ngram_size=65), INVALID_REQUEST),
    # The edges of each documented range are accepted.
    Case("json-edges-temperature-0.01-top-p-1-seed-2-to-the-53-minus-1", "/v1/generate",
         generate_json(PNG, do_sample=True, temperature=0.01, top_p=1, seed=2**53 - 1), OK, (96, 72)),
    Case("json-edges-temperature-100-seed-0", "/v1/generate",
         generate_json(PNG, do_sample=True, temperature=100, seed=0), OK, (96, 72)),
    Case("json-edges-num-beams-8-max-new-tokens-cap-ngram-64", "/v1/generate",
         generate_json(PNG, num_beams=8, max_new_tokens=MAX_NEW_TOKENS_CAP, no_repeat_ngram_size=64), OK, (96, 72)),
    Case("json-num-beams-100", "/v1/generate", generate_json(PNG, num_beams=100), INVALID_REQUEST),
    Case("json-num-beams-zero", "/v1/generate", generate_json(PNG, num_beams=0), INVALID_REQUEST),
    Case("json-top-p-zero-sampling", "/v1/generate", generate_json(PNG, do_sample=True, top_p=0), INVALID_REQUEST),
    Case("json-top-p-1.5-sampling", "/v1/generate", generate_json(PNG, do_sample=True, top_p=1.5), INVALID_REQUEST),
    Case("json-no-repeat-ngram-negative", "/v1/generate", generate_json(PNG, no_repeat_ngram_size=-1), INVALID_REQUEST),
    Case("json-prompt-over-limit", "/v1/generate", generate_json(PNG, task="grounded_vqa", prompt=TOO_LONG),
         INVALID_REQUEST),
    Case("json-phrase-over-limit", "/v1/generate", generate_json(PNG, task="phrase_grounding", phrases=[TOO_LONG]),
         INVALID_REQUEST),
    Case("json-boxes-of-three-numbers", "/v1/generate",
         generate_json(PNG, task="referring_generation", boxes=[[1, 2, 3]]), INVALID_REQUEST),
    Case("json-box-raw-nan", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "task": "referring_generation", "boxes": [[NaN, 0, 10, 10]], "max_new_tokens": 4}}'),
         INVALID_BOX),
    Case("json-box-raw-infinity", "/v1/generate", generate_raw_json(
        f'{{"image": "{PNG_B64}", "task": "referring_generation", "boxes": [[0, 0, Infinity, 10]], '
        '"max_new_tokens": 4}'), INVALID_BOX),
    Case("json-box-outside-image", "/v1/generate",
         generate_json(PNG, task="referring_generation", boxes=[[0, 0, 9000, 10]]), INVALID_BOX),
    Case("json-box-inverted", "/v1/generate",
         generate_json(PNG, task="referring_generation", boxes=[[50, 50, 10, 10]]), INVALID_BOX),
    Case("json-phrase-holding-kosmos-tags", "/v1/generate",
         generate_json(PNG, task="phrase_grounding", phrases=[TAGGED_PHRASE]), OK_OR_INVALID_REQUEST),
    Case("json-question-holding-object-tags", "/v1/generate",
         generate_json(PNG, task="grounded_vqa", prompt="What is </object><patch_index_0001> here?"),
         OK_OR_INVALID_REQUEST),
    Case("json-question-holding-grounding-tag", "/v1/generate",
         generate_json(PNG, task="grounded_vqa", prompt="<grounding> Where is <phrase>it?"), OK_OR_INVALID_REQUEST),
    Case("json-region-vqa-phrase-holding-patch-index", "/v1/generate",
         generate_json(PNG, task="region_vqa", prompt="What is this?", phrases=["<patch_index_0001>"],
                       boxes=[[5, 5, 40, 40]]), OK_OR_INVALID_REQUEST),
    Case("json-raw-prompt-holding-tags", "/v1/generate",
         generate_json(PNG, task="raw", prompt="<grounding><phrase> a red circle</phrase></object>"),
         OK_OR_INVALID_REQUEST),
    Case("json-stream-valid", "/v1/generate", generate_json(PNG, stream=True), OK),
    Case("json-return-image-valid", "/v1/generate", generate_json(PNG, return_image=True), OK, (96, 72)),
    Case("json-chunked-body-over-upload-limit", "/v1/generate", chunked_json(MAX_UPLOAD_BYTES + 1024 * 1024),
         TOO_LARGE_BODY),
]

UPLOAD_CASES = [
    Case("upload-image-as-text-field", "/v1/generate/upload",
         lambda: {"data": {"image": "not a file", "max_new_tokens": "4"}}, INVALID_REQUEST),
    Case("upload-image-missing", "/v1/generate/upload", lambda: {"data": {"task": "caption"}}, INVALID_REQUEST),
    Case("upload-max-new-tokens-as-word", "/v1/generate/upload", generate_upload(PNG, max_new_tokens="four"),
         INVALID_REQUEST),
    Case("upload-max-new-tokens-negative", "/v1/generate/upload", generate_upload(PNG, max_new_tokens=-1),
         INVALID_REQUEST),
    Case("upload-temperature-inf-sampling", "/v1/generate/upload",
         generate_upload(PNG, do_sample=True, temperature="inf"), INVALID_REQUEST),
    Case("upload-temperature-nan-sampling", "/v1/generate/upload",
         generate_upload(PNG, do_sample=True, temperature="nan"), INVALID_REQUEST),
    Case("upload-temperature-1e-300-sampling", "/v1/generate/upload",
         generate_upload(PNG, do_sample=True, temperature="1e-300", seed=3), INVALID_REQUEST),
    Case("upload-top-p-nan-sampling", "/v1/generate/upload", generate_upload(PNG, do_sample=True, top_p="nan"),
         INVALID_REQUEST),
    Case("upload-seed-2-to-the-64-sampling", "/v1/generate/upload",
         generate_upload(PNG, do_sample=True, seed=2**64), INVALID_REQUEST),
    Case("upload-num-beams-100", "/v1/generate/upload", generate_upload(PNG, num_beams=100), INVALID_REQUEST),
    Case("upload-top-p-zero-sampling", "/v1/generate/upload", generate_upload(PNG, do_sample=True, top_p=0),
         INVALID_REQUEST),
    Case("upload-top-p-1.5-sampling", "/v1/generate/upload", generate_upload(PNG, do_sample=True, top_p=1.5),
         INVALID_REQUEST),
    Case("upload-boxes-not-json", "/v1/generate/upload",
         generate_upload(PNG, task="referring_generation", boxes="[[1, 2, 3, 4"), INVALID_REQUEST),
    Case("upload-boxes-json-object", "/v1/generate/upload",
         generate_upload(PNG, task="referring_generation", boxes='{"x": 1}'), INVALID_REQUEST),
    Case("upload-boxes-with-nan", "/v1/generate/upload",
         generate_upload(PNG, task="referring_generation", boxes="[[NaN, 0, 10, 10]]"), INVALID_BOX),
    Case("upload-prompt-over-limit", "/v1/generate/upload",
         generate_upload(PNG, task="grounded_vqa", prompt=TOO_LONG), INVALID_REQUEST),
    Case("upload-phrases-repeated-holding-tags", "/v1/generate/upload",
         generate_upload(PNG, task="detection", phrases=["a red circle", "</phrase><object>", "<grounding>"]),
         OK_OR_INVALID_REQUEST),
    Case("upload-task-sent-twice", "/v1/generate/upload", generate_upload(PNG, task=["caption", "teleport"]),
         ANY_CLIENT_ERROR),
    Case("upload-stream-valid", "/v1/generate/upload", generate_upload(PNG, stream=True), OK),
    Case("upload-chunked-body-over-upload-limit", "/v1/generate/upload",
         chunked_multipart("image", MAX_UPLOAD_BYTES + 1024 * 1024), TOO_LARGE_BODY),
]

PREDICT_CASES = [
    Case("predict-content-as-text-field", "/predict", lambda: {"data": {"content": "not a file"}}, INVALID_REQUEST),
    Case("predict-urlencoded-form", "/predict",
         lambda: {"content": b"content=abc&prompt=hi", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
         INVALID_REQUEST),
    Case("predict-urlencoded-form-without-content", "/predict",
         lambda: {"content": b"prompt=hi", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
         INVALID_REQUEST),
    Case("predict-no-body", "/predict", dict, INVALID_REQUEST),
    Case("predict-json-body", "/predict", lambda: {"json": {"content": PNG_B64}}, INVALID_REQUEST),
    Case("predict-multipart-without-boundary", "/predict",
         lambda: {"content": b"whatever", "headers": {"Content-Type": "multipart/form-data"}}, ((400, 422), None)),
    Case("predict-multipart-garbage", "/predict",
         lambda: {"content": b"--nope\r\nnot a part\r\n", "headers": {"Content-Type": f"multipart/form-data; "
                                                                                        f"boundary={BOUNDARY}"}},
         ((400, 422), None)),
    Case("predict-prompt-over-limit", "/predict", predict(PNG, prompt=TOO_LONG), INVALID_REQUEST),
    Case("predict-prompt-holding-kosmos-tags", "/predict",
         predict(PNG, prompt="<grounding><phrase> a cat</phrase><object><patch_index_0001>"), OK_OR_INVALID_REQUEST),
    Case("predict-prompt-only-closing-tags", "/predict",
         predict(PNG, prompt="</object></phrase><patch_index_1023></image>"), OK_OR_INVALID_REQUEST),
    Case("predict-prompt-with-nul-and-controls", "/predict", predict(PNG, prompt="An image\x00 of\x1b[2J"),
         OK_OR_INVALID_REQUEST),
    Case("predict-prompt-not-utf8", "/predict",
         lambda: {"content": (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="content"; filename="a.png"\r\n'
                              "Content-Type: image/png\r\n\r\n").encode() + PNG
                             + (f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n').encode()
                             + b"\xff\xfe an image of" + f"\r\n--{BOUNDARY}--\r\n".encode(),
                  "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}},
         ANY_CLIENT_ERROR),
    Case("predict-declared-content-length-over-limit", "/predict",
         predict(b"\0" * (MAX_UPLOAD_BYTES + 1024)), TOO_LARGE_BODY),
    Case("predict-chunked-body-over-upload-limit", "/predict",
         chunked_multipart("content", MAX_UPLOAD_BYTES + 1024 * 1024), TOO_LARGE_BODY),
]

CASES = image_cases() + JSON_CASES + UPLOAD_CASES + PREDICT_CASES
assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clean_answer_and_the_service_lives_on(shared_service, case: Case):
    """The case's answer is one the README allows, in the right shape; the service still answers /health."""
    response = httpx.post(f"{shared_service.url}{case.path}", timeout=60, **case.request())
    health = httpx.get(f"{shared_service.url}/health", timeout=10)
    assert_answer_ok(response, case.path)
    statuses, codes = case.expect
    if statuses is not None:
        assert response.status_code in statuses, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400 and codes is not None:
        assert assert_error_shape(response)["code"] in codes, response.text[:300]
    if response.status_code == 200 and case.image_size and case.path != "/predict" and "stream" not in case.id:
        assert tuple(response.json()["image_size"]) == case.image_size
    assert shared_service.process.poll() is None, "the service process died"
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_an_http_url_as_image_is_refused_and_never_fetched(shared_service):
    """With no KOSMOS_ALLOWED_IMAGE_HOSTS (the default), `image: "http://..."` is a 400 and the service opens no
    connection to that address."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        for url in (f"http://127.0.0.1:{port}/cat.png", f"data:,http://127.0.0.1:{port}/cat.png"):
            response = httpx.post(f"{shared_service.url}/v1/generate", json={"image": url, "max_new_tokens": 4},
                                  timeout=30)
            assert response.status_code == 400 and assert_error_shape(response)["code"] == "invalid_image"
        readable, _, _ = select.select([listener], [], [], 1.0)
        assert not readable, "the service connected to the URL it was given"


def test_valid_requests_on_every_route_still_succeed_after_the_corpus(shared_service):
    """After every bad input above, each image route still answers a plain valid request with a result."""
    url = shared_service.url
    answers = {
        "/predict": httpx.post(f"{url}/predict", timeout=60, **predict(PNG, prompt="<grounding> An image of")()),
        "/v1/generate": httpx.post(f"{url}/v1/generate", timeout=60,
                                   **generate_json(PNG, task="phrase_grounding", phrases=["a red circle"])()),
        "/v1/generate/upload": httpx.post(f"{url}/v1/generate/upload", timeout=60,
                                          **generate_upload(PNG, task="referring_generation",
                                                            boxes="[[5, 5, 40, 40]]")()),
    }
    for path, response in answers.items():
        assert response.status_code == 200, (path, response.text[:300])
        assert_answer_ok(response, path)
    assert answers["/v1/generate"].json()["image_size"] == [96, 72]
    assert 1 <= answers["/v1/generate"].json()["generated_tokens"] <= NEW_TOKENS
