"""Joining a Ray cluster: the optional extra checked, the address checked fast, the connection closed after use.

`--ray` with no address joins the cluster named by RAY_ADDRESS, else starts a local one on this machine
(its processes bound to 127.0.0.1); `--ray HOST:PORT` (the head's GCS port, 6379 by default) or
`--ray ray://HOST:10001` (Ray Client) joins that cluster, and `--ray auto` the one started on this machine
with `ray start --head`. A process that is already connected (a test's `ray.init`) keeps its connection.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kosmos_serve.errors import KosmosServeError

INSTALL_HINT = "Ray is not installed: pip install 'kosmos-serve[ray]' (Ray Data and Ray Serve)."
REACH_TIMEOUT_S = 5.0


class ClusterError(KosmosServeError):
    """The Ray cluster cannot be used (Ray missing, the address unreachable, a worker failing); the message says why."""

    status = 503
    code = "cluster_unavailable"


def require_ray() -> None:
    """Fail with the install command when the `ray` extra is missing."""
    try:
        import ray
        import ray.data
        import ray.serve  # noqa: F401
    except ImportError:
        raise ClusterError(INSTALL_HINT) from None


def check_address(address: str | None) -> str | None:
    """The address to join (None: RAY_ADDRESS, else a new local cluster); a mistyped or unreachable one is an error.

    >>> check_address("auto")
    'auto'
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address in {"auto", "local"}:
        return address
    if "://" not in address and (Path(address).exists() or "/" in address):
        raise ClusterError(f"--ray took {address!r} as the cluster's address; write --ray=ADDRESS, or put --ray after "
                           "the inputs (e.g. annotate photos/ --out r.jsonl --ray).")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray {address!r} is not a Ray address; give HOST:PORT (the head's GCS port, 6379 by "
                           "default) or ray://HOST:10001.")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise ClusterError(f"No Ray cluster answers at {address} ({error.strerror or type(error).__name__}); start "
                           "one with `ray start --head` there, or check the address and port.") from None
    return address


@contextmanager
def connected(address: str | None) -> Iterator[str]:
    """Connected to the cluster for the block (yields a description of it); a connection made here is closed after."""
    require_ray()
    import ray

    if ray.is_initialized():
        yield "the connected Ray cluster"
        return
    address = check_address(address)
    local = address is None or address == "local"
    try:
        ray.init(address=None if local else address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, **({"_node_ip_address": "127.0.0.1"} if local else {}))
    except (ConnectionError, RuntimeError) as error:
        raise ClusterError(f"Cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: {error}") from None
    try:
        yield "a local Ray cluster" if local else f"the Ray cluster at {address}"
    finally:
        ray.shutdown()


def worker_error(error: BaseException) -> ClusterError:
    """A Ray task's crash (a bug, a worker killed or out of memory) as one message pointing at the worker's logs."""
    return ClusterError(f"A Ray worker failed, so the job stopped ({type(error).__name__}); that worker's Ray logs "
                        "(/tmp/ray/session_latest/logs on its node) have the details.")
