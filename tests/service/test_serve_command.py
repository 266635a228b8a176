"""`kosmos-serve serve` as a user runs it: a real process, configured by the reference's variables."""

from __future__ import annotations

import httpx
from click.testing import CliRunner

from kosmos_serve.cli import main
from kosmos_serve.config import ServerSettings


def test_the_reference_variables_keep_their_names_and_defaults(monkeypatch):
    defaults = ServerSettings()
    assert (defaults.port, defaults.log_level, defaults.num_api_servers) == (8000, "INFO", 1)
    assert defaults.max_batch_requests == 2
    assert defaults.default_prompt is None  # unset: the model's own default prompt, else the reference's
    for name, value in {"PORT": "9001", "LOG_LEVEL": "DEBUG", "NUM_API_SERVERS": "3", "MAX_BATCH_SIZE": "5",
                        "DEFAULT_PROMPT": "<grounding> Hi"}.items():
        monkeypatch.setenv(name, value)
    configured = ServerSettings()
    assert (configured.port, configured.log_level, configured.num_api_servers) == (9001, "DEBUG", 3)
    assert (configured.max_batch_requests, configured.default_prompt) == (5, "<grounding> Hi")


def test_serve_refuses_a_missing_model_at_once(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "nowhere" in result.output


def test_serve_runs_the_service_from_environment_variables(tiny_model_dir, png_bytes, command_service):
    env = {"PORT": "{port}", "KOSMOS_MODEL": str(tiny_model_dir), "KOSMOS_DEVICE": "cpu", "MAX_BATCH_SIZE": "4",
           "LOG_LEVEL": "INFO", "KOSMOS_QUANTIZE": "int8"}
    with command_service(["serve"], env) as service:
        answer = httpx.post(f"{service.url}/predict", files={"content": ("a.png", png_bytes[0])}, timeout=60)
        info = httpx.get(f"{service.url}/info").json()
    output = service.output
    assert answer.status_code == 200 and set(answer.json()) == {"output", "generated_text", "entities", "scores"}
    assert info["limits"]["max_batch_size"] == 4 and info["model"] == str(tiny_model_dir)
    assert info["quantize"] == "int8"
    assert info["weight_formats"] == {"vision": "int8 per row, fbgemm", "text": "int8 per row, fbgemm"}
    assert info["defaults"] == {"default_prompt": "<grounding> Describe this image:", "max_new_tokens": 128,
                                "no_repeat_ngram_size": 3, "min_score": 0.002,
                                "nms_iou": 0.5}  # the tiny model carries none: the built-in defaults
    assert "Application shutdown complete" in output  # SIGTERM stops it gracefully (uvicorn re-raises it after)
    assert "POST /predict -> 200" in output and "] POST /predict" in output  # access log with a request id
