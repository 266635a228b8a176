"""Fixtures: services on loopback, each a real `kosmos-serve serve --model demo` process (see support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import SHARED_ENV, Service, start_service


@pytest.fixture(scope="session")
def service_factory(tmp_path_factory):
    """`with service_factory(env) as service`: a service of its own, for tests that load, signal or break it."""
    log_dir = tmp_path_factory.mktemp("service-logs")
    return lambda env: start_service(env, log_dir)


@pytest.fixture(scope="session")
def shared_service(service_factory) -> Iterator[Service]:
    """One service for the bad-input corpus and the fuzzing, with the small limits of SHARED_ENV."""
    with service_factory(SHARED_ENV) as service:
        yield service
