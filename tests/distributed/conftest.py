"""A local Ray cluster (2 CPUs, on 127.0.0.1) per test module; without the `ray` extra only the tests of what a
missing Ray looks like run (the rest are not collected: pip install -e '.[ray]')."""

import os

import pytest

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

collect_ignore = [] if HAVE_RAY else ["test_ray_data.py", "test_ray_serve.py", "test_ray_gateway.py",
                                      "test_ray_kosmos25.py"]


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray started here and stopped after the module: every worker on this machine, one torch thread each."""
    import ray

    os.environ["KOSMOS_THREADS"] = "1"  # read by the engine settings built here and sent to the workers
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="WARNING")
    yield
    ray.shutdown()
    os.environ.pop("KOSMOS_THREADS", None)
