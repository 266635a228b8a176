"""The export tests' records: a folder of annotate records (tests/collections/records_for_export.py)."""

import pytest
from records_for_export import make_records, write_records


@pytest.fixture
def records(tmp_path):
    return make_records(tmp_path)


@pytest.fixture
def records_file(tmp_path, records):
    return write_records(tmp_path / "results.jsonl", records)
