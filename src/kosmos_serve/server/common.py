"""What every protocol's routes share: the service state, decoding an image, and watching for the client leaving."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated, Any

from fastapi import Request
from PIL import Image
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool

from kosmos_serve.generation import MinScore, NmsIou
from kosmos_serve.images import load_image
from kosmos_serve.server.state import ServiceState

# What every protocol says a box's score is (the engine computes it: kosmos_serve/engine/scoring.py).
SCORE_MEANING = ("the model's confidence that this box shows the phrase, 0..1: how much likelier the model finds "
                 "the phrase with this image than with a blank one, times how sure it is of the box's corners "
                 "(a box given in the prompt keeps 1.0)")
SCORES_DESCRIPTION = f"One score per box, in the order of `boxes`: {SCORE_MEANING}."
MIN_SCORE_DESCRIPTION = ("Drop boxes scored under this (0..1; an entity left with no box is dropped, its words stay "
                         "in the text). Unset: every box is kept, except for the detection task, which drops boxes "
                         "under the service's default (GET /info `defaults.min_score`; KOSMOS_MIN_SCORE).")

NMS_IOU_DESCRIPTION = ("Of two boxes of different phrases overlapping by more than this IoU (0..1), drop the "
                       "lower-scored one: one region, one phrase (1: off). Unset: off, except for the detection task, "
                       "which uses the service's default (GET /info `defaults.nms_iou`; KOSMOS_NMS_IOU).")


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1.0: a threshold that keeps nothing but certainties
        raise PydanticCustomError("float_type", "Input should be a valid number from 0 to 1, not a boolean")
    return value


# The engine's MinScore (0..1, finite), as the protocols' bodies take it: a JSON true or false is refused too.
MinScoreField = Annotated[MinScore, BeforeValidator(_not_a_boolean)]
NmsIouField = Annotated[NmsIou, BeforeValidator(_not_a_boolean)]


def service_state(request: Request) -> ServiceState:
    """The state of the app answering `request`."""
    return request.app.state.service


async def decode_image(state: ServiceState, data: bytes) -> Image.Image:
    """`data` as an RGB image, decoded off the event loop; the pixel cap is checked from the header first."""
    max_pixels = state.engine_settings.max_image_pixels
    return await run_in_threadpool(functools.partial(load_image, data, max_pixels=max_pixels))


async def client_gone(request: Request) -> None:
    """Returns once the HTTP client has disconnected (call it after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """One watcher of the client's disconnection, shared by a request's several generations; `close` it at the end."""

    def __init__(self, request: Request):
        self._request = request
        self._task: asyncio.Task | None = None

    async def __call__(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(client_gone(self._request))
        await asyncio.shield(self._task)

    def close(self) -> None:
        """Stop watching."""
        if self._task is not None:
            self._task.cancel()
