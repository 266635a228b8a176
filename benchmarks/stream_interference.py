"""What a long streamed request costs the requests beside it: 7 plain requests alone and with an 800-token stream.

    python benchmarks/stream_interference.py                  # 9 paired rounds on the tiny random model
    python benchmarks/stream_interference.py --against /path/to/main/src --rounds 3 --repeats 3

The service's own path, in one process: a `Batcher` over an engine on the project's tiny model (a step there
costs little but the host's work, as on a GPU), its engine thread beside the event loop that relays the
stream. A round runs two arms, in alternating order: 7 brief captions (32 new tokens, the service's n-gram
ban) sent together, alone; and the same 7 sent while an 8th request, streamed, 800 new tokens, decodes
(sent 0.3 s before them; its consumer reads every piece, as the server-sent events route does). Each arm's
figure is the 7's mean latency; a round's ratio is with / alone; the report gives every ratio and their
median. Beside it, the process's CPU seconds while the 7 run (engine thread and event loop together), with /
alone: the work the stream adds, which a machine shared with other work disturbs less than the latencies.
Every request is on a fresh image of the same size. `--eighth plain` sends the 8th unstreamed: the control,
what an 8th row costs the 7 without any streaming.

The stream's tokens reach the event loop as the service hands them over (`--stream-interval-ms`, by default the
service's `stream_interval_ms`). `--against SRC` runs the rounds with the `kosmos_serve` package under SRC (say, a
checkout of main) and with this one, each in its own processes, alternately `--repeats` times, and reports both;
`--intervals 0,20` does the same with this tree at each stream interval. The CPU heads the report.
"""

from __future__ import annotations

import argparse
import asyncio
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
OTHERS = 7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="paired rounds (per process with --against)")
    parser.add_argument("--stream-tokens", type=int, default=800, help="the streamed request's new tokens")
    parser.add_argument("--tokens", type=int, default=32, help="each of the 7's new tokens")
    parser.add_argument("--eighth", choices=["streamed", "plain"], default="streamed",
                        help="the long request streamed, or plain (the control: what an 8th row costs unstreamed)")
    parser.add_argument("--lead", type=float, default=0.3, help="seconds the long request decodes before the 7 come")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--stream-interval-ms", type=float, help="the batcher's stream interval (default: the service's)")
    parser.add_argument("--against", type=Path, help="another source tree's src/ to measure alternately with this one")
    parser.add_argument("--intervals", help="comma-separated stream intervals (ms) to measure alternately, this tree")
    parser.add_argument("--repeats", type=int, default=3, help="with --against: processes of each, alternating")
    parser.add_argument("--json", action="store_true", help="print the rounds as one JSON line (used by --against)")
    args = parser.parse_args()
    if args.against or args.intervals:
        compare(args)
        return
    rounds = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(rounds))
        return
    print(cpu_description())
    print()
    report({"this tree": rounds}, args)


async def measure(args) -> list[dict]:
    """Each round: the 7's mean latency alone and beside the stream, and the stream's own tokens."""
    import torch

    from kosmos_serve.config import EngineSettings, ServerSettings
    from kosmos_serve.engine import Engine
    from kosmos_serve.engine.batcher import Batcher

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EngineSettings(model=str(prepare_model(tiny=True)), device="cpu",
                              max_new_tokens_cap=max(args.stream_tokens, args.tokens))
    options = {}
    if "stream_interval" in inspect.signature(Batcher).parameters:  # not in sources from before it
        interval = args.stream_interval_ms
        options["stream_interval"] = (ServerSettings().stream_interval_ms if interval is None else interval) / 1000
    batcher = Batcher(Engine(settings), max_requests=OTHERS + 1, batch_timeout=0.0, max_queue=64, **options)
    batcher.start()
    try:
        await seven(batcher, args.tokens)  # warm-up: the first requests pay for lazy set-up
        rounds = []
        for index in range(args.rounds):
            arms = {}
            for arm in (("alone", "with") if index % 2 == 0 else ("with", "alone")):
                if arm == "alone":
                    arms["alone"], arms["alone_cpu"] = await seven(batcher, args.tokens)
                else:
                    (arms["with"], arms["with_cpu"]), arms["stream_tokens"] = await seven_beside_a_stream(batcher, args)
            rounds.append(arms)
            print(f"round {index + 1}: alone {arms['alone']:.3f} s, with the stream {arms['with']:.3f} s "
                  f"(x{arms['with'] / arms['alone']:.3f}; CPU x{arms['with_cpu'] / arms['alone_cpu']:.3f})", file=sys.stderr)
        return rounds
    finally:
        await batcher.stop()


async def seven(batcher, tokens: int) -> tuple[float, float]:
    """The 7 brief captions sent together: their mean latency, and the process's CPU seconds until the last ends."""
    requests = [caption(tokens) for _ in range(OTHERS)]

    async def timed(request) -> float:
        began = time.perf_counter()
        await batcher.submit(request)
        return time.perf_counter() - began

    cpu = time.process_time()
    latencies = await asyncio.gather(*map(timed, requests))
    return statistics.mean(latencies), time.process_time() - cpu


async def seven_beside_a_stream(batcher, args) -> tuple[tuple[float, float], int]:
    """The 7 sent `--lead` seconds after a long request (streamed, or plain with `--eighth plain`), while it
    decodes: `seven`'s figures, and the tokens the long one wrote."""
    long = caption(args.stream_tokens)

    async def consume() -> int:
        if args.eighth == "plain":
            return (await batcher.submit(long)).generated_tokens
        async for piece in batcher.stream(long):
            if isinstance(piece, str):
                json.dumps({"text": piece})  # what the server-sent events route does with each piece
            else:
                return piece.generated_tokens
        return 0

    running = asyncio.ensure_future(consume())
    await asyncio.sleep(args.lead)  # its prefill done, it decodes (800 tokens take longer than the 7)
    figures = await seven(batcher, args.tokens)
    return figures, await running


def caption(tokens: int):
    from kosmos_serve.engine import GenerationParams, Request
    from kosmos_serve.tasks import TaskInput

    image = Image.effect_noise((96, 96), 60).convert("RGB")  # random noise: a fresh image each time
    return Request(image, TaskInput("caption"), GenerationParams(max_new_tokens=tokens))


def compare(args) -> None:
    """This tree and `args.against` (or this tree at each of `args.intervals`), in alternating processes of
    `args.rounds` rounds each."""
    if args.intervals:
        arms = {f"interval {ms} ms": (OWN_SOURCE, ["--stream-interval-ms", ms]) for ms in args.intervals.split(",")}
    else:
        interval = ["--stream-interval-ms", str(args.stream_interval_ms)] if args.stream_interval_ms is not None else []
        arms = {f"before ({args.against.resolve()})": (args.against.resolve(), []),
                f"after ({OWN_SOURCE})": (OWN_SOURCE, interval)}
    rounds: dict[str, list[dict]] = {label: [] for label in arms}
    for repeat in range(args.repeats):
        for label, (source, extra) in arms.items():
            command = [sys.executable, __file__, "--json", "--rounds", str(args.rounds), "--tokens", str(args.tokens),
                       "--stream-tokens", str(args.stream_tokens), "--eighth", args.eighth, "--lead", str(args.lead)]
            command += (["--threads", str(args.threads)] if args.threads else []) + extra
            output = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(source)}, check=True,
                                    capture_output=True, text=True).stdout
            rounds[label] += json.loads(output.splitlines()[-1])
            print(f"repeat {repeat + 1}/{args.repeats}: {label} done", file=sys.stderr)
    print(cpu_description())
    print()
    report(rounds, args)


def report(runs: dict[str, list[dict]], args) -> None:
    print(f"7 brief captions ({args.tokens} new tokens) alone and beside a {args.eighth} {args.stream_tokens}-token "
          f"request (sent {args.lead} s before them), tiny model, threads {args.threads or 'default'}; mean latency of "
          f"the 7 per arm, paired rounds:")
    print()
    print("| source | rounds | alone (s, median) | with the stream (s, median) | with / alone, median | "
          "with / alone, each round | CPU s with / alone, median | stream tokens |")
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for label, rounds in runs.items():
        ratios = [r["with"] / r["alone"] for r in rounds]
        cpu = statistics.median(r["with_cpu"] / r["alone_cpu"] for r in rounds)
        print(f"| {label} | {len(rounds)} | {statistics.median(r['alone'] for r in rounds):.3f} | "
              f"{statistics.median(r['with'] for r in rounds):.3f} | **{statistics.median(ratios):.3f}** | "
              f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} | {cpu:.3f} | {min(r['stream_tokens'] for r in rounds)} |")


if __name__ == "__main__":
    main()
