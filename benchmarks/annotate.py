"""Images per second of `kosmos-serve annotate` against the same images sent one at a time through the engine.

    python benchmarks/annotate.py                  # full-size Kosmos-2 architecture, random weights, --quantize int8
    python benchmarks/annotate.py --model DIR      # a real checkpoint folder instead
    python benchmarks/annotate.py --tiny           # a quick check of the script on the tiny model

Speed: detection with 3 phrases on 16 fresh 640x480 JPEG photos, int8 weights, in one process with
the model loaded once. "one at a time" is `Engine.predict` per image (each decoded just before);
"annotate" is the command's runner (`AnnotateRun`: what `kosmos-serve annotate` runs once the model is
loaded: decoding threads, batches, records written to a file). The two alternate for `--rounds`
rounds on the same images, the image-feature cache emptied before each, so a busy machine's slow
moments fall on both. Memory: the real command (`kosmos-serve annotate`) on the demo model over 16,
64, 256 and 1024 fresh images, each in its own process: its peak RSS (VmHWM).
Results print as markdown (`--out FILE` appends them there).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import prepare_model  # the full-size architecture with random weights, built once

PHRASES = ("a red car", "a person on a bike", "a dog")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: full-size architecture, random weights)")
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random model (checks the script)")
    parser.add_argument("--images", type=int, default=16, help="fresh images in the speed comparison")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens per phrase")
    parser.add_argument("--batch-size", type=int, default=8, help="annotate --batch-size")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the speed comparison")
    parser.add_argument("--memory-counts", default="16,64,256,1024", help="image counts of the demo-model memory runs")
    parser.add_argument("--parts", default="speed,memory", help="what to measure: speed, memory or both")
    parser.add_argument("--out", type=Path, help="append the markdown report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="int8", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    parts = args.parts.split(",")
    model_dir = (args.model or prepare_model(args.tiny)) if "speed" in parts else None
    quantize = "none" if args.tiny else "int8"
    speed, memory = None, []
    with tempfile.TemporaryDirectory() as scratch:
        if "speed" in parts:
            photos = write_photos(Path(scratch) / "speed", args.images, seed=11)
            speed = worker("speed", args, model=model_dir, folder=photos, quantize=quantize)
        for count in map(int, args.memory_counts.split(",")) if "memory" in parts else []:
            folder = write_photos(Path(scratch) / f"memory-{count}", count, seed=count)
            memory.append({"images": count, **worker("command", args, model="demo", folder=folder, quantize="none")})
    report = render(speed, memory, args, model_dir, quantize)
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as file:
            file.write(report + "\n")


def write_photos(folder: Path, count: int, seed: int) -> Path:
    """`count` distinct 640x480 JPEG files (quality 90) in `folder`, made one at a time (bench.py's noise images)."""
    from PIL import Image

    folder.mkdir(parents=True)
    for index in range(count):
        image = Image.effect_noise((640, 480), 40 + (seed * 37 + index) % 50).convert("RGB").rotate(index)
        image.save(folder / f"{index:04d}.jpg", quality=90)
    return folder


def worker(name: str, args, *, model, folder: Path, quantize: str) -> dict:
    """Run one measurement in a process of its own (so its peak memory is its own)."""
    print(f"measuring {name} on {folder.name} ...", file=sys.stderr, flush=True)
    command = [sys.executable, __file__, "--worker", name, "--model", str(model), "--folder", str(folder),
               "--new-tokens", str(args.new_tokens), "--batch-size", str(args.batch_size), "--rounds",
               str(args.rounds), "--quantize", quantize]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def measure_speed(args) -> dict:
    """One at a time and annotate's runner, alternating on the same images with the same loaded engine."""
    import torch

    from kosmos_serve.cli.annotate import annotate_jobs
    from kosmos_serve.collections.inputs import collect_images
    from kosmos_serve.collections.records import RecordAppender, read_previous
    from kosmos_serve.collections.runner import AnnotateRun, engine_settings
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams
    from kosmos_serve.engine.loading import quiet_transformers, set_threads
    from kosmos_serve.images import load_image
    from kosmos_serve.tasks import TaskInput

    quiet_transformers()
    params = GenerationParams(max_new_tokens=args.new_tokens)
    settings = EngineSettings(model=str(args.model), device="cpu", quantize=args.quantize)
    jobs = annotate_jobs(collect_images([str(args.folder)]), settings, params, None, None, PHRASES, (), False, None)
    settings = engine_settings(settings, jobs, args.batch_size)  # as the command sets it
    set_threads(settings.threads)
    engine = Engine(settings)
    task = TaskInput("detection", phrases=PHRASES)
    engine.predict(load_image(jobs[0].entry.resolved).rotate(180), task, params)  # warm-up, on an image not timed

    def one_at_a_time() -> float:
        began = time.perf_counter()
        for job in jobs:
            engine.predict(load_image(job.entry.resolved), task, params)
        return time.perf_counter() - began

    def annotate() -> float:
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "records.jsonl"
            with RecordAppender(out, read_previous(out)) as appender:
                run = AnnotateRun(engine, appender, set(), params=params, model=str(args.model),
                                  batch_size=args.batch_size)
                return run.run(jobs).seconds

    rounds = []
    for number in range(args.rounds):
        measured = {}
        for name, work in sorted({"one-at-a-time": one_at_a_time, "annotate": annotate}.items(),
                                 reverse=number % 2 == 0):
            engine.cache.clear()
            measured[name] = work()
        rounds.append(measured)
    return {"images": len(jobs), "rounds": rounds, "breakdown": breakdown(engine, jobs, task, args),
            "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads()}


def breakdown(engine, jobs, task, args) -> dict:
    """Seconds per image of the parts of a request, alone and with a batch's images: vision, prefill, decoding."""
    from PIL import Image

    from kosmos_serve.engine import GenerationParams, Request
    from kosmos_serve.images import load_image

    flip = Image.Transpose.FLIP_TOP_BOTTOM  # new pixels: no feature of the rounds above is reused
    images = [load_image(job.entry.resolved).transpose(flip) for job in jobs[: args.batch_size]]

    def per_image(count: int, new_tokens: int) -> float:
        engine.cache.clear()
        requests = [Request(image, task, GenerationParams(max_new_tokens=new_tokens)) for image in images[:count]]
        began = time.perf_counter()
        engine.run(requests)
        return (time.perf_counter() - began) / count

    engine.cache.clear()
    began = time.perf_counter()
    engine.encode_images(images)
    parts = {"vision": (time.perf_counter() - began) / len(images)}
    for label, count in (("alone", 1), ("batched", len(images))):
        parts[f"{label}_first_token"] = per_image(count, 1)
        parts[f"{label}_whole"] = per_image(count, args.new_tokens)
    return parts


def measure_command(args) -> dict:
    """The real command, in this process; images per second from its summary."""
    from kosmos_serve.cli import main as cli

    with tempfile.TemporaryDirectory() as scratch:
        command = ["annotate", str(args.folder), "--out", f"{scratch}/records.jsonl", "--model", str(args.model),
                   "--quantize", args.quantize, "--max-new-tokens", str(args.new_tokens), "--batch-size",
                   str(args.batch_size), "--quiet", *(arg for phrase in PHRASES for arg in ("--phrase", phrase))]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli(command, standalone_mode=False)
    match = re.search(r"^(\d+) annotated, .*?; ([\d.]+) images/s \(([\d.]+) s\)", printed.getvalue(), re.MULTILINE)
    return {"images_per_second": float(match[2]), "seconds": float(match[3]), "annotated": int(match[1]),
            "peak_rss_gib": peak_rss_gib()}


WORKERS = {"speed": measure_speed, "command": measure_command}


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: since its exec; ru_maxrss would count the parent's at fork)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024**2


def cpu_description() -> str:
    """lscpu's model name, and which of avx2 / avx512* / amx* its flags list."""
    listing = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in listing.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    vector = [flag for flag in flags if flag == "avx2" or flag.startswith("avx512")]
    amx = [flag for flag in flags if flag.startswith("amx")] or ["no amx"]
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs; "
            f"flags: {' '.join(vector)}; {' '.join(amx)}")


def render(speed: dict | None, memory: list[dict], args, model_dir, quantize: str) -> str:
    """The report: each round's seconds and images per second, the ratio; peak memory per image count."""
    import torch
    import transformers

    command = f"python benchmarks/annotate.py {' '.join(sys.argv[1:])}".strip()
    lines = [
        f"### `{command}`",
        "",
        f"CPU: {cpu_description()}. torch {torch.__version__}, transformers {transformers.__version__}.",
    ]
    if speed:
        count = speed["images"]
        lines += [
            "",
            (f"Speed: detection with {len(PHRASES)} phrases, {args.new_tokens} new tokens each, on {count} fresh "
             f"640x480 JPEG images; model {Path(model_dir).name}, --quantize {quantize}, annotate --batch-size "
             f"{args.batch_size}; {speed['threads']} torch threads; peak RSS {speed['peak_rss_gib']:.1f} GiB."),
            "",
            "| round | one at a time | annotate | annotate / one at a time |",
            "| --- | --- | --- | --- |",
        ]
        for number, measured in enumerate(speed["rounds"], start=1):
            alone, batched = measured["one-at-a-time"], measured["annotate"]
            lines.append(f"| {number} | {alone:.1f} s ({count / alone:.3f} images/s) | {batched:.1f} s "
                         f"({count / batched:.3f} images/s) | {alone / batched:.2f}x |")
        ratios = [m["one-at-a-time"] / m["annotate"] for m in speed["rounds"]]
        lines.append(f"| median | | | {statistics.median(ratios):.2f}x |")
        parts, steps = speed["breakdown"], args.new_tokens - 1
        lines += ["", f"Where an image's time goes (seconds per image; the batch: {args.batch_size} images together):",
                  "", "| | vision | first token (vision, prefill, 1 step) | whole request | decoding, per image per step |",
                  "| --- | --- | --- | --- | --- |"]
        for label in ("alone", "batched"):
            first, whole = parts[f"{label}_first_token"], parts[f"{label}_whole"]
            lines.append(f"| {label} | {parts['vision']:.2f} s (encoder batch of {args.batch_size}) | {first:.2f} s "
                         f"| {whole:.2f} s | {(whole - first) / steps * 1000:.0f} ms |")
    if memory:
        lines += ["", "Memory: `kosmos-serve annotate` on the demo model (--batch-size 8), a process per run.", "",
                  "| images | images/s | peak RSS |", "| --- | --- | --- |"]
        lines += [f"| {row['images']} | {row['images_per_second']:.1f} | {row['peak_rss_gib'] * 1024:.0f} MiB |"
                  for row in memory]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
