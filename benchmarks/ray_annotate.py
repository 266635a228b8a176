"""`kosmos-serve annotate` locally vs on a local Ray cluster (1 and 2 workers): images per second, Ray's overhead.

Each way annotates the same synthetic scenes twice, a small and a large folder, with the demo model (about 50
images a second on 2 cores, so the folders are large: the whole benchmark takes about 8 minutes); the
difference between the two sizes gives the time per image without the fixed start-up cost (the model loading,
and on Ray the actors starting), and the start-up cost itself. Every run is a whole
`annotate` command (in this process, through click), timed from start to exit; Ray's own start (`ray.init`,
once) is timed apart. Ray's overhead per image is 1 worker of 1 CPU against the local run with 1 torch thread
(the same arithmetic; Ray's driver, raylet and object store have the other core). Then, from the best measured
per-image time on Ray, what N machines would give.

    flock -x /tmp/kosmos-machine.lock python benchmarks/ray_annotate.py
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from kosmos_serve.cli import main
from kosmos_serve.training.shapes import write_shapes_dataset

MACHINES = (1, 2, 4, 8, 16, 64)
COLLECTION = 1_000_000  # the projection's collection size


def annotate(folder: Path, out: Path, environment: dict[str, str], *ray_args: str) -> float:
    """Seconds of one whole annotate command (detection of two phrases) on `folder`."""
    began = time.perf_counter()
    result = CliRunner().invoke(main, ["annotate", str(folder), "--out", str(out), "--model", "demo", "--phrase",
                                       "a blue circle", "--phrase", "a red square", "--quiet", *ray_args],
                                env=environment)
    seconds = time.perf_counter() - began
    images = len(list(folder.glob("*.png")))
    if result.exit_code != 0 or f"{images} annotated, 0 skipped" not in result.output:
        raise SystemExit(f"annotate did not annotate the {images} images: {result.output}")
    return seconds


def cpu_line() -> str:
    """The CPU's model name, its cores and its vector extensions (avx2, avx512, amx), from lscpu."""
    text = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8") if flag in flags]
    return f"{fields.get('Model name', platform.processor()).strip()}, {os.cpu_count()} cores, {' '.join(wanted)}"


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="images in the small folder")
    parser.add_argument("--large", type=int, default=2000, help="images in the large folder")
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-annotate-"))
    folders = {size: write_shapes_dataset(work / f"scenes-{size}", size, seed=7).parent / "images"
               for size in (arguments.small, arguments.large)}
    cores = os.cpu_count()
    one_thread = {"KOSMOS_THREADS": "1"}
    ways = {  # name: (environment, annotate's Ray options)
        f"local, {cores} torch threads": ({}, ()),
        "local, 1 torch thread": (one_thread, ()),
        "Ray, 1 worker x 1 CPU": ({}, ("--ray", "--workers", "1", "--cpus-per-worker", "1")),
        f"Ray, 1 worker x {cores} CPUs": ({}, ("--ray", "--workers", "1", "--cpus-per-worker", str(cores))),
        f"Ray, {cores} workers x 1 CPU": ({}, ("--ray", "--workers", str(cores), "--cpus-per-worker", "1")),
    }
    timings: dict[str, dict[int, float]] = {}
    ray_start = 0.0
    for way, (environment, ray_args) in ways.items():
        if ray_args and not ray_start:
            import ray

            began = time.perf_counter()
            ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, logging_level="WARNING")
            ray_start = time.perf_counter() - began
        timings[way] = {size: annotate(folder, work / f"run-{len(timings)}-{size}.jsonl", environment, *ray_args)
                        for size, folder in folders.items()}  # a file of its own per run: nothing is resumed
    small, large = arguments.small, arguments.large
    import ray
    import torch

    print(f"Command: python benchmarks/ray_annotate.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"CPU: {cpu_line()}; torch {torch.__version__}, ray {ray.__version__}")
    print(f"Images: {small} and {large} synthetic scenes (demo model, detection of 2 phrases); ray.init: "
          f"{ray_start:.1f} s\n")
    print(f"| way | s for {small} | s for {large} | start-up s | s per image | images/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    per_image = {}
    for way, seconds in timings.items():
        per_image[way] = (seconds[large] - seconds[small]) / (large - small)
        start_up = seconds[small] - small * per_image[way]
        print(f"| {way} | {seconds[small]:.1f} | {seconds[large]:.1f} | {start_up:.1f} | {per_image[way]:.3f} | "
              f"{1 / per_image[way]:.2f} |")
    overhead = per_image["Ray, 1 worker x 1 CPU"] - per_image["local, 1 torch thread"]
    print(f"\nRay overhead per image (1 worker x 1 CPU against local with 1 torch thread): {overhead * 1000:+.1f} ms")
    machine_rate = max(1 / seconds for way, seconds in per_image.items() if way.startswith("Ray"))
    print(f"\nProjection, {COLLECTION:,} images, each machine like this one at {machine_rate:.2f} images/s:")
    print("| machines | images/s | hours |")
    print("| ---: | ---: | ---: |")
    for machines in MACHINES:
        rate = machines * machine_rate
        print(f"| {machines} | {rate:.1f} | {COLLECTION / rate / 3600:.1f} |")


if __name__ == "__main__":
    main_benchmark()
