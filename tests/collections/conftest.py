"""Shared by the collection tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One torch thread: the tiny model gains nothing from more, and a shared machine's cores stay free."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("KOSMOS_THREADS", "1")
    yield
    torch.set_num_threads(threads)
