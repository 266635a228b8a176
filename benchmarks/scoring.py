"""What scoring costs a detection request: one engine with and without it, interleaved, in one run.

    python benchmarks/scoring.py                 # full-size Kosmos-2 architecture, random weights, int8
    python benchmarks/scoring.py --quantize none # float32 weights
    python benchmarks/scoring.py --tiny          # a quick check of the script on the tiny model
    python benchmarks/scoring.py --breakdown     # also where each kind's time goes: vision, prefill, extension, steps

A detection request asks for 4 phrases on a fresh image (no feature cache, so vision counts) and
generates 6 tokens per phrase, what `<object><patch><patch></object></s>` takes. "Without scoring"
is the same engine with its three scoring hooks turned off: the prefill keeps only the last position's
logits, no step takes a log-softmax, no phrase prior is computed. "First sight" forgets the phrase
priors before each request, so its admission reads its 4 phrases on the blank image (one pass after
the cached blank beginning); "seen" has them already (an ontology over a collection). The CPU heads
the report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench import cpu_description, prepare_model  # the benchmark scripts' shared helpers

PHRASES = ("a red circle", "a blue square", "a green triangle", "a yellow star")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random model")
    parser.add_argument("--quantize", default="int8", choices=["none", "int8", "auto"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--breakdown", action="store_true", help="time each part of a request's work too")
    args = parser.parse_args()

    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import GenerationParams, Request, start_engine
    from kosmos_serve.tasks import TaskInput

    engine = start_engine(EngineSettings(model=str(prepare_model(args.tiny)), device="cpu", quantize=args.quantize,
                                         image_cache_size=0, max_batch_rows=8))
    params = GenerationParams(max_new_tokens=6, min_score=0.0)
    scoring = {name: getattr(engine, name) for name in ("scored_tail", "note_evidence", "score")}
    unscored = {"scored_tail": lambda prompt: 0, "note_evidence": lambda *args: None,
                "score": lambda output, *args: output}

    def timed(hooks: dict, first_sight: bool, seed: int) -> float:
        for name, hook in hooks.items():
            setattr(engine, name, hook)
        if first_sight:
            engine.phrase_priors._cache.clear()
        image = Image.effect_noise((320, 240), 40 + seed % 50).convert("RGB")  # a fresh image each time
        began = time.perf_counter()
        engine.run([Request(image, TaskInput("detection", phrases=PHRASES), params)])
        return time.perf_counter() - began

    parts = time_parts(engine) if args.breakdown else {}
    timed(scoring, True, 0)  # warm-up: kernels, allocator, the blank image's features
    times: dict[str, list[float]] = {"without scoring": [], "scored, phrases seen": [], "scored, first sight": []}
    part_times: dict[str, dict[str, list[float]]] = {name: {part: [] for part in parts} for name in times}

    def measured(name: str, hooks: dict, first_sight: bool, seed: int) -> None:
        for spent in parts.values():
            spent.clear()
        times[name].append(timed(hooks, first_sight, seed))
        for part, spent in parts.items():
            part_times[name][part].append(sum(spent))

    for repeat in range(args.repeats):
        measured("without scoring", unscored, False, 3 * repeat)
        measured("scored, phrases seen", scoring, False, 3 * repeat + 1)
        measured("scored, first sight", scoring, True, 3 * repeat + 2)
    base = statistics.median(times["without scoring"])
    print(cpu_description())
    print(f"\nDetection request, {len(PHRASES)} phrases, quantize={args.quantize}, "
          f"{'tiny model' if args.tiny else 'full-size architecture'}, median of {args.repeats}:\n")
    print("| engine | seconds | vs without scoring |\n| --- | ---: | ---: |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.3f}x |")
    if parts:
        print("\nWhere the time goes (median seconds per request):\n")
        print("| engine | " + " | ".join(parts) + " |\n| --- |" + " ---: |" * len(parts))
        for name, by_part in part_times.items():
            print(f"| {name} | " + " | ".join(f"{statistics.median(values):.3f}" for values in by_part.values()) + " |")


def time_parts(engine) -> dict[str, list[float]]:
    """Wrap the engine's steps so that each call's seconds are noted under its part's name; the lists to read."""
    from kosmos_serve.engine import decode, scheduler

    parts: dict[str, list[float]] = {}

    def timing(owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)
        spent = parts.setdefault(part, [])

        def timed_call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - began)

        setattr(owner, attribute, timed_call)

    timing(engine, "encode_images", "vision")
    timing(decode, "_prefill", "prefill")
    timing(decode, "_copy_rows_with_room", "cache copies")
    timing(decode, "_extend", "extension")
    timing(scheduler, "decode_step", "decode steps")
    return parts


if __name__ == "__main__":
    main()
