"""What starting the segmenter's image embedding on admission gains: requests with masks, overlapped or not.

    python benchmarks/mask_overlap.py                # full-size Kosmos-2 and SAM ViT-B, random weights
    python benchmarks/mask_overlap.py --tiny         # a quick check of the script on the tiny random models

kosmos-serve's scheduler hands each admitted request that asks for masks to the segmenter's own thread
(`Segmenter.prepare`), so the segmenter embeds the image while Kosmos-2 encodes it and decodes the boxes; the mask
decoder then runs when the request completes. This script runs the same batch of requests (fresh images, a given
box each: `referring_generation`, so every result has a box to mask) through one engine, with that start on
admission and with it switched off (each embedding then computed when its request completes, in the engine's
thread, as before), alternating, and reports the median wall time of a batch. Denormal floats are flushed (random
SAM weights on a real image make denormal activations: benchmarks/masks.py). The CPU heads the report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench import cpu_description, prepare_model  # the benchmark scripts' shared helpers
from masks import build as build_segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random models")
    parser.add_argument("--requests", type=int, default=4, help="requests in a batch, each with its own image")
    parser.add_argument("--rounds", type=int, default=2, help="batches per setting, the settings alternating")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.engine.loading import quiet_transformers
    from kosmos_serve.tasks import Task, TaskInput

    quiet_transformers()
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        engine = Engine(EngineSettings(model=str(prepare_model(args.tiny)), device="cpu",
                                       segmenter=str(build_segmenter("sam", Path(folder) / "sam", args.tiny))))
        task = TaskInput(Task.REFERRING_GENERATION, boxes=((64, 48, 320, 360),))
        params = GenerationParams(max_new_tokens=args.new_tokens, masks=True, min_score=0.0)
        seeds = iter(range(10_000))
        prepare = engine.segmenter.prepare

        def batch_seconds(overlapped: bool) -> float:
            engine.segmenter.prepare = prepare if overlapped else (lambda image, key: None)
            images = [Image.effect_noise((640, 480), 20 + next(seeds)).convert("RGB") for _ in range(args.requests)]
            began = time.perf_counter()
            results = engine.run([Request(image, task, params) for image in images])
            assert all(entity.masks for result in results for entity in result.entities)
            return time.perf_counter() - began

        batch_seconds(True)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for overlapped in (False, True):
                times[overlapped].append(batch_seconds(overlapped))
    before, after = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {args.requests} requests with masks, {args.new_tokens} new tokens | embedding on completion "
          f"{before:.2f} s | embedding started on admission {after:.2f} s | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
