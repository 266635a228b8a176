"""The service schedules per decode step: arrivals join a running batch, streamed and plain requests share it."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_short_request_is_answered_while_a_long_stream_decodes_and_metrics_move(serve, png_bytes):
    def long_stream(url):
        began = time.monotonic()
        with httpx.stream("POST", f"{url}/v1/generate/upload", files={"image": ("a.png", png_bytes[0])},
                          data={"max_new_tokens": "400", "no_repeat_ngram_size": "0", "stream": "true"},
                          timeout=120) as response:
            body = "".join(response.iter_text())
        return began, time.monotonic(), body

    def short(url):
        answer = httpx.post(f"{url}/v1/generate/upload", files={"image": ("b.png", png_bytes[1])},
                            data={"max_new_tokens": "4"}, timeout=120)
        return answer, time.monotonic()

    with serve(max_batch_requests=4, batch_timeout_ms=0) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(long_stream, url)
        deadline = time.monotonic() + 30
        while metric(httpx.get(f"{url}/metrics").text, "kosmos_requests_running") < 1:  # the stream is decoding
            assert time.monotonic() < deadline
            time.sleep(0.01)
        answer, short_done = short(url)
        _, stream_done, body = streaming.result()
        metrics = httpx.get(f"{url}/metrics").text
    assert answer.status_code == 200 and answer.json()["generated_tokens"] == 4
    assert "event: result" in body and short_done < stream_done  # it did not wait for the stream to end
    assert metric(metrics, "kosmos_time_to_first_token_seconds_count") == 2
    assert metric(metrics, "kosmos_time_per_output_token_seconds_count") == 2
    assert 0 < metric(metrics, "kosmos_time_to_first_token_seconds_sum")
    assert metric(metrics, "kosmos_requests_running") == 0 and metric(metrics, "kosmos_requests_waiting") == 0
    steps = metric(metrics, "kosmos_batch_size_count")
    assert metric(metrics, 'kosmos_batch_size_bucket{le="1.0"}') < steps  # both decoded in the same steps
