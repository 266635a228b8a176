"""Where a Kosmos-2.5 page's first token goes: the vision pass and the prefill, per weight format and attention.

    python benchmarks/kosmos25_first_token.py                          # none and auto, SDPA (the engine's default)
    python benchmarks/kosmos25_first_token.py --attention eager        # the vision attention transformers runs

The full-size Kosmos-2.5 architecture with random weights (built once, as benchmarks/kosmos25.py builds it), one
1024x1024 page of rendered text (4,096 patches) read with `<ocr>` for one new token, in a fresh process per format
(each its own load and quantization). Prints one line per format: seconds in the vision pass (encoder and
projection), in the prefill (2,048 image tokens and the prompt through the text decoder), and in the whole request.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kosmos25 import cpu_description, pages, prepare_model  # benchmarks/kosmos25.py's page and model


def measure(quantize: str, attention: str, model_dir: Path) -> dict:
    """One page read for one token by an engine with `quantize` and `attention`; the seconds of each part."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import GenerationParams, Request, decode, start_engine
    from kosmos_serve.tasks import Task, TaskInput

    engine = start_engine(EngineSettings(model=str(model_dir), device="cpu", quantize=quantize, attention=attention,
                                         image_cache_size=0))
    spent = {"vision": 0.0, "prefill": 0.0}

    def timing(owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        def timed_call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - began

        setattr(owner, attribute, timed_call)

    timing(engine, "encode_images", "vision")
    timing(decode, "_prefill", "prefill")
    began = time.perf_counter()
    engine.run([Request(pages(1, 99)[0], TaskInput(Task.OCR), GenerationParams(max_new_tokens=1))])
    return {"quantize": quantize, "attention": attention, "request_s": time.perf_counter() - began,
            **{f"{part}_s": seconds for part, seconds in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="none,auto", help="kosmos-serve --quantize settings to measure")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = prepare_model(tiny=False)
    if args.worker:
        print(json.dumps(measure(args.worker, args.attention, model_dir)))
        return
    print(cpu_description())
    print("\n| quantize | attention | vision | prefill | first token (request of 1 token) |\n|---|---|---:|---:|---:|")
    for quantize in args.formats.split(","):
        command = [sys.executable, __file__, "--worker", quantize, "--attention", args.attention]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"| {quantize} | {args.attention} | {row['vision_s']:.1f} s | {row['prefill_s']:.1f} s | "
              f"{row['request_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
