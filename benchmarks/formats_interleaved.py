"""kosmos-serve's weight formats in one process, their timings interleaved, for a machine shared with other work.

    python benchmarks/formats_interleaved.py                      # int8 and int4, full-size random checkpoint
    python benchmarks/formats_interleaved.py --formats int8,int4 --rounds 5 --profile

bench.py measures each format in its own process, one after another: on a machine that other jobs load, the
load changes between them. Here every format's engine is loaded once in one process and each round measures
all of them in turn, with the memory bandwidth (bench.py's matrix-vector product) in the same round, so a
format's decode step is compared with its bandwidth floor (its text weights' bytes over the bandwidth of the
same round) and with the other formats under the same load. Per round and format: one request alone (brief
caption, 32 new tokens, a fresh image), its decode step (step by step, as bench.py times it), and 8 requests
together through the engine (8 rows decoding at once; requests per second). Medians over the rounds print as a
markdown table; `--profile` adds torch.profiler's table of one format's decode steps at batch 1 (the ops by
self time, linear layers and the rest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import CAPTION, cpu_description, decode_step_time, fresh_images, prepare_model, text_weight_bytes

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine import Engine, GenerationParams, Request
from kosmos_serve.tasks import Task, TaskInput


def bandwidth_gb_s() -> float:
    """bench.py's measure: a 1 GiB float32 matrix-vector product, as a decode step reads its weights."""
    matrix, vector = torch.randn(16384, 16384), torch.randn(16384)
    matrix @ vector
    began = time.perf_counter()
    for _ in range(3):
        matrix @ vector
    return 3 * matrix.numel() * 4 / (time.perf_counter() - began) / 1e9


def measure_round(engine: Engine, images, new_tokens: int) -> dict:
    params = GenerationParams(max_new_tokens=new_tokens, no_repeat_ngram_size=0)
    caption = TaskInput(Task.CAPTION)
    began = time.perf_counter()
    engine.run([Request(next(images), caption, params)])
    request_s = time.perf_counter() - began
    step_s = decode_step_time(engine, Request(next(images), caption, params))
    batch = [Request(next(images), caption, params) for _ in range(8)]
    began = time.perf_counter()
    engine.run(batch)
    return {"request_s": request_s, "decode_step_s": step_s, "rows8_req_s": 8 / (time.perf_counter() - began)}


def profile_steps(engine: Engine, images, steps: int) -> str:
    """torch.profiler's table over `steps` decode steps of one request alone."""
    from torch.profiler import ProfilerActivity, profile

    scheduler = engine.scheduler()
    scheduler.add(Request(next(images), TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=steps + 4,
                                                                                 no_repeat_ngram_size=0)))
    for _ in range(3):
        scheduler.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            scheduler.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=44)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bench.py's full-size random one)")
    parser.add_argument("--formats", default="int8,int4", help="kosmos-serve --quantize settings (none: float32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="also profile each format's decode steps (batch 1)")
    args = parser.parse_args()
    model_dir = args.model or prepare_model(tiny=False)
    engines = {name: Engine(EngineSettings(model=str(model_dir), device="cpu", quantize=name, max_batch_rows=8,
                                           image_cache_size=0)) for name in args.formats.split(",")}
    images = iter(fresh_images(1000, seed=7))
    for engine in engines.values():
        engine.run([Request(next(images), TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=2))])  # warm-up
    rounds = {name: [] for name in engines}
    for index in range(args.rounds):
        for name, engine in engines.items():
            bandwidth = bandwidth_gb_s()
            figures = measure_round(engine, images, args.new_tokens)
            figures["floor_s"] = text_weight_bytes(engine.model) / (bandwidth * 1e9)
            figures["bandwidth"] = bandwidth
            rounds[name].append(figures)
            print(f"round {index} {name}: {figures}", file=sys.stderr, flush=True)
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} threads; {args.rounds} rounds, medians\n")
    print("| --quantize | text weights | text bytes a step | bandwidth | decode step (x floor) | request | "
          "8 rows together, req/s |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, engine in engines.items():
        median = {key: statistics.median(r[key] for r in rounds[name]) for key in rounds[name][0]}
        ratio = statistics.median(r["decode_step_s"] / r["floor_s"] for r in rounds[name])
        print(f"| {name} | {engine.model.weight_formats['text']} | {text_weight_bytes(engine.model) / 1e9:.2f} GB | "
              f"{median['bandwidth']:.1f} GB/s | {median['decode_step_s'] * 1000:.0f} ms ({ratio:.2f}x of "
              f"{median['floor_s'] * 1000:.0f} ms) | {median['request_s']:.2f} s | {median['rows8_req_s']:.3f} |")
    if args.profile:
        for name, engine in engines.items():
            print(f"\n#### {name}: 8 decode steps at batch 1 under torch.profiler\n\n```\n"
                  f"{profile_steps(engine, images, 8)}\n```")
    print(f"\nCaption `{CAPTION}`, {args.new_tokens} new tokens, fresh 640x480 images.")


if __name__ == "__main__":
    main()
