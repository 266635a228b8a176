"""The scheduler's host work per decode step: everything in a step but the model's forward pass.

    python benchmarks/host_work.py               # the tiny random model, where a forward costs almost nothing
    python benchmarks/host_work.py --rows 1,8,64 --steps 48 --no-repeat-ngram-size 3
    python benchmarks/host_work.py --against /path/to/main/src --repeats 3   # before / after, alternating

Rows of greedy brief captions decode together on the project's tiny model (a forward there takes about what
a GPU's would: the host's share is what is left to measure). A step is `Scheduler.step()` once every row is
admitted and none has finished; the model's share is the time inside the text model's forward (hooks around
it), the host's is the rest: token choice and logits processors, scoring evidence, streaming callbacks, the
cache's bookkeeping. Each count of rows runs plain and streamed (every row streamed), medians over the steps.
A streamed row's text is made by its consumer (the event loop, off the engine thread): that is not the step's
work and not timed here (`stream_interference.py` measures what it costs the others).

`--against SRC` runs the same measurement with the `kosmos_serve` package under SRC (say, a checkout of main)
and with this one, each in its own process, alternately `--repeats` times, and reports both side by side
(medians over the repeats of each run's median). The CPU heads the report.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench import cpu_description, prepare_model  # the benchmark scripts' shared helpers

OWN_SOURCE = Path(__file__).resolve().parent.parent / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,64", help="rows decoding together")
    parser.add_argument("--steps", type=int, default=48, help="decode steps measured per run")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="the rows' n-gram ban (0: none; the service's default is 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--against", type=Path, help="another source tree's src/ to measure alternately with this one")
    parser.add_argument("--repeats", type=int, default=3, help="with --against: runs of each, alternating")
    parser.add_argument("--json", action="store_true", help="print one JSON line per measurement (used by --against)")
    args = parser.parse_args()
    if args.against:
        compare(args)
        return
    results = measure(args)
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    print(cpu_description())
    print()
    print(f"Host work per decode step, tiny model, greedy captions (no_repeat_ngram_size={args.no_repeat_ngram_size}), "
          f"median of {args.steps} steps:")
    print()
    print("| rows | streamed | step (ms) | model forward (ms) | host (ms) | host per row (us) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']} | {'yes' if r['streamed'] else 'no'} | {r['step'] * 1e3:.2f} | {r['forward'] * 1e3:.2f} | "
              f"{r['host'] * 1e3:.2f} | {r['host'] / r['rows'] * 1e6:.0f} |")


def measure(args) -> list[dict]:
    """Per count of rows, plain and streamed: the median step, forward and host seconds."""
    import torch

    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.engine.scheduler import Scheduler
    from kosmos_serve.tasks import TaskInput

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(count) for count in args.rows.split(",")]
    engine = Engine(EngineSettings(model=str(prepare_model(tiny=True)), device="cpu", max_batch_rows=max(rows)))
    forward_seconds = ForwardClock(engine.model.text_model)
    # past the measured steps and the admission step, so that no row ends inside the window
    params = GenerationParams(max_new_tokens=args.steps + 8, no_repeat_ngram_size=args.no_repeat_ngram_size)
    images = [Image.effect_noise((64 + row, 64), 40 + row % 50).convert("RGB") for row in range(max(rows))]
    results = []
    for count in rows:
        for streamed in (False, True):
            scheduler = Scheduler(engine, max_rows=count)
            for image in images[:count]:
                scheduler.add(Request(image, TaskInput("caption"), params), **stream_callback(streamed))
            scheduler.step()  # admission: every row prefilled, none decoded yet
            steps, forwards = [], []
            for _ in range(args.steps):
                forward_seconds.total = 0.0
                began = time.perf_counter()
                finished = scheduler.step()
                steps.append(time.perf_counter() - began)
                forwards.append(forward_seconds.total)
                assert not finished, "a row ended inside the measured steps; raise max_new_tokens"
            host = [step - forward for step, forward in zip(steps, forwards)]
            results.append({"rows": count, "streamed": streamed, "step": statistics.median(steps),
                            "forward": statistics.median(forwards), "host": statistics.median(host)})
            while scheduler.busy:
                scheduler.step()
    return results


def stream_callback(streamed: bool) -> dict:
    """The `Scheduler.add` argument that streams a request to a consumer that does nothing: token ids
    (`on_tokens`), or, in the scheduler before issue 28, text detokenised on the engine thread (`on_text`)."""
    from kosmos_serve.engine.scheduler import Scheduler

    if not streamed:
        return {}
    name = "on_tokens" if "on_tokens" in inspect.signature(Scheduler.add).parameters else "on_text"
    return {name: lambda piece: None}


def compare(args) -> None:
    """This tree and `args.against` measured alternately, each run in its own process; both side by side."""
    sources = {"before": args.against.resolve(), "after": OWN_SOURCE}
    runs: dict[str, list[list[dict]]] = {label: [] for label in sources}
    for repeat in range(args.repeats):
        for label, source in sources.items():
            command = [sys.executable, __file__, "--json", "--rows", args.rows, "--steps", str(args.steps),
                       "--no-repeat-ngram-size", str(args.no_repeat_ngram_size)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = {**os.environ, "PYTHONPATH": str(source)}
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs[label].append([json.loads(line) for line in output.splitlines() if line.startswith("{")])
            print(f"repeat {repeat + 1}/{args.repeats}: {label} ({source}) done", file=sys.stderr)
    print(cpu_description())
    print()
    print(f"Host work per decode step (ms), tiny model, greedy captions (no_repeat_ngram_size="
          f"{args.no_repeat_ngram_size}), threads {args.threads or 'default'}; median over {args.repeats} alternating "
          f"runs of each run's median of {args.steps} steps; before: {sources['before']}, after: {sources['after']}")
    print()
    print("| rows | streamed | step before | step after | host before | host after | host after / before |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for index, first in enumerate(runs["after"][0]):
        step, host = ({label: statistics.median(run[index][key] for run in runs[label]) * 1e3 for label in sources}
                      for key in ("step", "host"))
        print(f"| {first['rows']} | {'yes' if first['streamed'] else 'no'} | {step['before']:.2f} | {step['after']:.2f} | "
              f"{host['before']:.2f} | {host['after']:.2f} | {host['after'] / host['before']:.2f} |")


class ForwardClock:
    """Seconds spent inside `module`'s forward since `total` was last set (a pre- and a post-forward hook)."""

    def __init__(self, module):
        self.total = 0.0
        self._began = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module, inputs):
        self._began = time.perf_counter()

    def _stop(self, module, inputs, output):
        self.total += time.perf_counter() - self._began


if __name__ == "__main__":
    main()
