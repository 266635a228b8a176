"""`serve --ray`: the service as a Ray Serve application, its replicas each running the whole FastAPI app.

Two deployments:
- `KosmosReplica` (`--replicas N`, or `--autoscale MIN,MAX`): the HTTP API `create_api` builds (every route
  but the web demo), with its own engine, batcher and image-feature cache. Its constructor loads and warms up
  the model, so a replica is routed to only once its model is ready, and `serve.run` returns (the CLI
  prints the address) only when every replica is.
- `Gateway` (the HTTP ingress): hands each request, unchanged, to a replica and streams the answer back.
  Requests about the same image go to the same replica (`ImageAffinityRouter`), so its cache keeps working.
  A request whose replica dies before its answer is whole is sent to another one (Ray Serve replaces the
  dead replica); after FORWARD_ATTEMPTS the client gets 503 with Retry-After. A plain answer is gathered
  whole before it is sent, so that holds up to its last byte; a stream (server-sent events) is passed on
  as it comes, so one whose replica dies after its first event is cut off (the connection closes).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from kosmos_serve.config import EngineSettings, ServerSettings, Settings
from kosmos_serve.distributed.cluster import ClusterError, connected
from kosmos_serve.errors import ModelLoadError, ServiceBusyError
from kosmos_serve.server.app import create_api, service_error_map

try:  # the `ray` extra; without it this module still imports (its doctests run) and `serve --ray` names the install
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import RayServeException
    from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
except ImportError:
    RequestRouter = object

logger = logging.getLogger("kosmos_serve.ray_serve")
APP_NAME = "kosmos-serve"
REPLICA_HEADER = b"x-kosmos-replica"  # which replica answered: its Ray Serve replica id
SESSION_HEADER = "x-session-id"  # Ray Serve's session header: an explicit affinity key
FORWARD_ATTEMPTS = 3
RETRY_AFTER_S = 5
MIN_IMAGE_BYTES = 256  # a body's longest run shorter than this is not taken for an image
FORWARDED_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
                        "client", "server")


@dataclass(frozen=True)
class ServeOptions:
    """How the application runs on Ray: a fixed number of replicas, or autoscaling between two bounds."""

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0


def affinity_key(session_id: str | None, body: bytes) -> str:
    """The image a request is about: its X-Session-Id when sent, else a hash of the body's longest run between
    quotes and line breaks (in practice the image: its base64 in JSON, its bytes in a multipart upload).

    >>> key = affinity_key(None, b'{"image": "' + b"A" * 300 + b'", "prompt": "one"}')
    >>> key == affinity_key(None, b'{"prompt": "two", "image": "' + b"A" * 300 + b'"}')
    True
    >>> affinity_key("photo-17", b""), affinity_key(None, b'{"task": "caption"}')
    ('photo-17', '')
    """
    if session_id:
        return session_id
    longest = max(re.split(rb'["\r\n]', body), key=len) if body else b""
    return hashlib.sha1(longest).hexdigest() if len(longest) >= MIN_IMAGE_BYTES else ""


def rendezvous_score(key: str, replica_id: str) -> int:
    """Highest-random-weight hashing: the replica with the top score for a key owns it (few keys move on changes)."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


class ImageAffinityRouter(RequestRouter):
    """A key's requests go to the replica that owns the key (rendezvous hashing); when that one is full, to the
    less busy of two others. Requests without a key: the less busy of two random replicas (Ray's default)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        owner = max(candidate_replicas, key=lambda replica: rendezvous_score(key, replica.replica_id.unique_id))
        others = [replica for replica in candidate_replicas if replica is not owner]
        return [[owner], random.sample(others, min(2, len(others)))]


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the gateway received it: the parts of its ASGI scope an app reads, and its whole body."""

    scope: dict
    body: bytes


class KosmosReplica:
    """One replica: the FastAPI app with its own engine, batcher and cache; requests come in as ASGI calls."""

    async def __init__(self, settings: ServerSettings, engine_settings: EngineSettings, cpus: float):
        import ray

        threads = engine_settings.threads or max(1, int(cpus))  # the CPUs the replica claims, unless set
        self.app = create_api(settings, engine_settings.model_copy(update={"threads": threads}))
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        state = self.app.state.service
        while state.batcher is None and state.load_error is None:
            await asyncio.sleep(0.05)
        if state.load_error is not None:
            raise ModelLoadError(f"the replica on {ray.util.get_node_ip_address()}: {state.load_error}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id.encode()

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[dict]:
        """Run `request` through the app; yields its ASGI messages (the response start, then body chunks)."""
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        body = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await asyncio.Event().wait()  # no disconnect until the gateway's call is cancelled

        async def run_app() -> None:
            try:
                await self.app({**request.scope, "asgi": {"version": "3.0"}, "root_path": ""}, receive, messages.put)
            finally:
                messages.put_nowait(None)

        call = asyncio.create_task(run_app())
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica_id)]}
                yield message
        finally:
            call.cancel()

    async def __del__(self):
        await self.lifespan.__aexit__(None, None, None)


class Gateway:
    """The HTTP ingress: each request to a replica (by image), its answer streamed back; a dead replica's retried."""

    def __init__(self, replicas):
        self.replicas = replicas

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        forwarded = ForwardedRequest({key: request.scope[key] for key in FORWARDED_SCOPE_KEYS if key in request.scope},
                                     body)
        handle = self.replicas.options(stream=True, session_id=affinity_key(request.headers.get(SESSION_HEADER), body))
        for attempt in range(FORWARD_ATTEMPTS):
            answer = handle.forward.remote(forwarded)
            try:
                start = await answer.__anext__()
                if not is_event_stream(start["headers"]):  # whole before it is sent: a death mid-body is retried
                    response = Response(b"".join([chunk async for chunk in body_chunks(answer)]), start["status"])
                    response.raw_headers = list(start["headers"])
                    return response
            except (RayActorError, ActorUnavailableError) as error:
                logger.warning("A replica failed before answering %s (%s); attempt %d of %d", request.url.path,
                               type(error).__name__, attempt + 1, FORWARD_ATTEMPTS)
                continue
            response = StreamingResponse(body_chunks(answer), status_code=start["status"])
            response.raw_headers = list(start["headers"])
            return response
        busy = ServiceBusyError("No replica could answer (they failed or restarted); try again shortly.",
                                retry_after=RETRY_AFTER_S)
        return service_error_map().response(busy, request)  # in the wire shape of the protocol asked


def is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's headers announce server-sent events (streamed as they come, not gathered first)."""
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream") for name, value in headers)


async def body_chunks(answer) -> AsyncIterator[bytes]:
    """The body of a forwarded answer, chunk by chunk as the replica sends it."""
    async for message in answer:
        if message["type"] == "http.response.body":
            yield message.get("body", b"")


def build_application(settings: ServerSettings, engine_settings: EngineSettings, options: ServeOptions):
    """The Ray Serve application: the gateway in front of the model replicas."""
    scaling = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                       "target_ongoing_requests": settings.max_batch_requests}}
               if options.autoscale else {"num_replicas": options.replicas})
    replicas = serve.deployment(
        KosmosReplica, name="KosmosReplica", **scaling,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        max_ongoing_requests=max(8, 4 * settings.max_batch_requests),  # beyond it, a key's requests spill to others
        max_constructor_retry_count=1,  # a replica that cannot load the model fails the deployment at once
        request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter),
    ).bind(settings, engine_settings, options.cpus_per_replica)
    gateway = serve.deployment(Gateway, name="Gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return gateway.bind(replicas)


def deploy(settings: ServerSettings, engine_settings: EngineSettings, options: ServeOptions) -> None:
    """Deploy the application on the connected cluster and wait until every replica's model is ready.

    The settings come as `create_api` takes them: a process's one `Settings` serves as both.
    """
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_application(settings, engine_settings, options), name=APP_NAME, route_prefix="/")
    except (RuntimeError, RayServeException) as error:
        application = serve.status().applications.get(APP_NAME)
        messages = [str(error), *(d.message for d in application.deployments.values())] if application else [str(error)]
        found = re.search(r"ModelLoadError: (.+)", "\n".join(messages))
        reason = found.group(1) if found else "a replica failed to start; the Ray Serve logs have the details"
        serve.delete(APP_NAME)
        raise ClusterError(f"The service could not start on Ray: {reason}") from None


def serve_on_ray(settings: Settings, options: ServeOptions, announce: Callable[[str], None]) -> None:
    """Deploy, announce the address once every replica is ready, serve until Ctrl-C or SIGTERM, then delete the
    application (and stop the local cluster, when one was started for it)."""
    with connected(options.address) as cluster:
        deploy(settings, settings, options)
        replicas = (f"{options.autoscale[0]} to {options.autoscale[1]} replicas" if options.autoscale
                    else f"{options.replicas} replica{'s' * (options.replicas > 1)}")
        address = f"http://{settings.host}:{settings.port}"
        announce(f"kosmos-serve on {cluster}: {replicas} ready at {address} (Ctrl-C stops)")
        previous = signal.signal(signal.SIGTERM, interrupt)  # `kill`, `docker stop`: the same clean stop as Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            announce("Stopping: the application is deleted from the cluster.")
        finally:
            signal.signal(signal.SIGTERM, previous)
            serve.delete(APP_NAME)


def interrupt(signum, frame) -> None:
    """A signal handler that stops the main thread as Ctrl-C does."""
    raise KeyboardInterrupt
