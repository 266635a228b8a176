"""`serve` and `demo`: the HTTP service in worker processes on this machine, or as a Ray Serve application."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable

import click

from kosmos_serve.cli.options import listen_options, model_options, setting_option, settings_from_flags
from kosmos_serve.config import Settings
from kosmos_serve.errors import InvalidRequestError

# Commands import their work lazily: --help and argument errors answer without loading torch, uvicorn or Ray.


@click.command()
@model_options
@listen_options
@setting_option("--max-batch-size", "max_batch_requests", "Most requests batched together", show_default=True,
                type=int)
@setting_option("--workers", "num_api_servers", "Worker processes, each with its own model", show_default=True,
                type=int)
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run as a Ray Serve application (pip install 'kosmos-serve[ray]'): ADDRESS (HOST:PORT, "
                   "ray://HOST:10001 or auto) joins that cluster; without one, RAY_ADDRESS, else a new local cluster.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="--ray: replicas, each with its own model, batcher and image cache.")
@click.option("--autoscale", metavar="MIN,MAX", help="--ray: scale between MIN and MAX replicas with the load.")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="--ray: CPUs each replica claims (its torch threads).")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="--ray: GPUs each replica claims (its engine then runs on a GPU).")
def serve(ray_address, replicas, autoscale, cpus_per_replica, gpus_per_replica, **flags):
    """Run the HTTP service: POST /predict (drop-in), /v1 JSON API, /docs, /health, /ready, /metrics.

    Every setting is also an environment variable (README: Configuration); the API key is one only
    (KOSMOS_API_KEY), so it never shows in a process list. With --ray, the same service runs as a Ray
    Serve application on a cluster (the web demo aside).
    """
    ray_only = replicas != 1 or autoscale or cpus_per_replica != 1.0 or gpus_per_replica
    if ray_address is None and ray_only:
        raise InvalidRequestError("--replicas, --autoscale, --cpus-per-replica and --gpus-per-replica go with --ray.")
    settings = settings_from_flags(Settings, flags)
    if ray_address is None:
        run_service(settings)
        return
    from kosmos_serve.distributed.cluster import require_ray

    require_ray()
    from kosmos_serve.distributed.ray_serve import ServeOptions, serve_on_ray

    if settings.num_api_servers != 1:
        raise InvalidRequestError("--workers is for one machine; with --ray, use --replicas or --autoscale.")
    options = ServeOptions(ray_address or None, replicas, parse_autoscale(autoscale) if autoscale else None,
                           cpus_per_replica, gpus_per_replica)
    serve_on_ray(settings, options, announce=click.echo)


def parse_autoscale(value: str) -> tuple[int, int]:
    """`MIN,MAX` replicas -> (MIN, MAX), 1 <= MIN <= MAX.

    >>> parse_autoscale("1,4")
    (1, 4)
    """
    low, _, high = value.replace(" ", "").partition(",")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise InvalidRequestError(f"--autoscale {value!r}: write MIN,MAX replicas with 1 <= MIN <= MAX, e.g. 1,4.")
    return int(low), int(high)


@click.command()
@model_options
@listen_options
def demo(**flags):
    """Run the web demo: the HTTP service in one process, with its Gradio page at /demo.

    Needs the demo extra: pip install -e ".[demo]".
    """
    from kosmos_serve.demo import DEMO_PATH, INSTALL_HINT, demo_available

    if not demo_available():
        raise click.ClickException(INSTALL_HINT)
    run_service(
        settings_from_flags(Settings, {**flags, "num_api_servers": 1, "demo": True}),
        announce=lambda address: f"Kosmos-2 demo: {address}{DEMO_PATH}/ (the model loads in the background)",
    )


def run_service(settings: Settings, announce: Callable[[str], str] | None = None) -> None:
    """Serve the app of `settings` in `settings.num_api_servers` worker processes, as `uvicorn.run` would.

    Each worker builds its app from `settings` (handed over pickled). A missing model, or a segmenter that is none
    or needs packages not installed, fails here, in a second, before any worker starts.
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from kosmos_serve.asgi import app_for_worker
    from kosmos_serve.engine.loading import resolve_source
    from kosmos_serve.engine.segmentation import check_segmenter

    resolve_source(settings.model)
    if settings.segmenter is not None:
        check_segmenter(settings.segmenter)
    if announce is not None:
        shown_host = "127.0.0.1" if settings.host in {"0.0.0.0", "::"} else settings.host
        click.echo(announce(f"http://{shown_host}:{settings.port}"))
    config = uvicorn.Config(
        functools.partial(app_for_worker, settings), factory=True, host=settings.host, port=settings.port,
        workers=settings.num_api_servers, log_level=settings.log_level.lower(), access_log=False,
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C before the servers handle signals themselves
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    if config.workers == 1 and not server.started:  # e.g. the port taken: uvicorn's exit code for it
        sys.exit(STARTUP_FAILURE)
