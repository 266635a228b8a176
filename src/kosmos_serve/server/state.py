"""What the routes share: settings, metrics, and the engine and batcher once the model is ready."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from kosmos_serve.config import EngineSettings, ServerSettings
from kosmos_serve.engine import Batcher, Engine, PreparedRequest, Request, Result
from kosmos_serve.errors import ModelLoadError, RequestTimeoutError, ServiceBusyError
from kosmos_serve.generation import BUILT_IN_DEFAULTS, REFERENCE_DEFAULT_PROMPT
from kosmos_serve.server.image_sources import image_bytes
from kosmos_serve.server.metrics import Metrics

LOADING_RETRY_AFTER = 5  # seconds


@dataclass
class ServiceState:
    """What the routes share: settings, metrics, and the engine and batcher once ready."""

    settings: ServerSettings
    engine_settings: EngineSettings
    metrics: Metrics
    engine: Engine | None = None
    batcher: Batcher | None = None
    load_error: str | None = None

    def ready_batcher(self) -> Batcher:
        """The batcher, or a 503 saying why the model cannot answer yet."""
        if self.batcher is not None:
            return self.batcher
        if self.load_error is not None:
            raise ModelLoadError(self.load_error)
        raise ServiceBusyError("The model is still loading; try again shortly.", retry_after=LOADING_RETRY_AFTER)

    async def image_bytes(self, reference: str) -> bytes:
        """The bytes of an image given as base64, a data: URI, or a URL on an allowed host (fetched)."""
        settings = self.settings
        return await image_bytes(reference, settings.allowed_image_hosts, settings.max_upload_bytes,
                                 settings.image_fetch_timeout_s)

    @property
    def default_prompt(self) -> str:
        """`POST /predict`'s prompt when none is sent: DEFAULT_PROMPT if set, else the model's, else the reference's."""
        if self.settings.default_prompt is not None:
            return self.settings.default_prompt
        return self.engine.defaults.default_prompt if self.engine is not None else REFERENCE_DEFAULT_PROMPT

    @property
    def default_min_score(self) -> float:
        """The score under which Label Studio's and Supervisely's boxes are dropped when a request sets none.

        The engine's default (KOSMOS_MIN_SCORE, else the model's `kosmos_serve.json`, else the built-in), the one
        detection uses; before the model is loaded, KOSMOS_MIN_SCORE or the built-in.
        """
        if self.engine is not None:
            return self.engine.defaults.min_score
        configured = self.engine_settings.min_score
        return configured if configured is not None else BUILT_IN_DEFAULTS.min_score

    @property
    def default_nms_iou(self) -> float:
        """The IoU over which detection drops the lower-scored of two phrases' boxes when a request sets none: the
        engine's default, as `default_min_score`."""
        if self.engine is not None:
            return self.engine.defaults.nms_iou
        configured = self.engine_settings.nms_iou
        return configured if configured is not None else BUILT_IN_DEFAULTS.nms_iou

    def prepare(self, request: Request) -> PreparedRequest:
        """`request` validated by the engine (when a caller needs its prompts or defaults before it runs)."""
        self.ready_batcher()
        return self.engine.prepare(request)

    async def generate(
        self, request: Request | PreparedRequest, client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> Result:
        """Validate now (a bad request never reaches a batch), then queue and wait, within the time limit.

        When `client_gone()` completes first (the HTTP client disconnected), the request is dropped
        unrun if it is still queued.
        """
        batcher = self.ready_batcher()
        try:
            return await batcher.submit(request, timeout=self.settings.request_timeout_s, client_gone=client_gone)
        except TimeoutError:
            raise RequestTimeoutError(
                f"The request took longer than {self.settings.request_timeout_s:g} s (KOSMOS_REQUEST_TIMEOUT_S)."
            ) from None

    def stream(
        self, request: Request | PreparedRequest, client_gone: Callable[[], Awaitable[None]] | None = None
    ) -> AsyncGenerator[str | Result, None]:
        """Validate and queue now (a bad request or a full queue raises here); then each piece of text, then the result.

        Closing the iterator early, or `client_gone()` completing, drops the request if it is still queued and
        otherwise stops it after its current token.
        """
        return self.ready_batcher().stream(request, client_gone)
