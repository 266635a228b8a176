"""The scheduler's host work per decode step: everything in a step but the model's forward pass.

    python benchmarks/host_work.py               # the tiny random model, where a forward costs almost nothing
    python benchmarks/host_work.py --rows 1,8,64 --steps 48

Rows of greedy brief captions decode together on the project's tiny model (a forward there takes about what
a GPU's would: the host's share is what is left to measure). A step is `Scheduler.step()` once every row is
admitted and none has finished; the model's share is the time inside the text model's forward (hooks around
it), the host's is the rest: token choice and logits processors, detokenising, streaming callbacks, the
cache's bookkeeping. Each count of rows runs plain and streamed (every row with a text callback), medians
over the steps. The CPU heads the report.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,64", help="rows decoding together")
    parser.add_argument("--steps", type=int, default=48, help="decode steps measured per run")
    args = parser.parse_args()

    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.engine.scheduler import Scheduler
    from kosmos_serve.tasks import TaskInput

    rows = [int(count) for count in args.rows.split(",")]
    engine = Engine(EngineSettings(model=str(prepare_model(tiny=True)), device="cpu", max_batch_rows=max(rows)))
    forward_seconds = ForwardClock(engine.model.text_model)
    # past the measured steps and the admission step, so that no row ends inside the window
    params = GenerationParams(max_new_tokens=args.steps + 8, no_repeat_ngram_size=0)
    images = [Image.effect_noise((64 + row, 64), 40 + row % 50).convert("RGB") for row in range(max(rows))]

    print(cpu_description())
    print()
    print(f"Host work per decode step, tiny model, greedy captions, median of {args.steps} steps:")
    print()
    print("| rows | streamed | step (ms) | model forward (ms) | host (ms) | host per row (us) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for count in rows:
        for streamed in (False, True):
            scheduler = Scheduler(engine, max_rows=count)
            for image in images[:count]:
                scheduler.add(Request(image, TaskInput("caption"), params), on_text=(lambda text: None) if streamed else None)
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
            print(f"| {count} | {'yes' if streamed else 'no'} | {statistics.median(steps) * 1e3:.2f} | "
                  f"{statistics.median(forwards) * 1e3:.2f} | {statistics.median(host) * 1e3:.2f} | "
                  f"{statistics.median(host) / count * 1e6:.0f} |")
            while scheduler.busy:
                scheduler.step()


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
