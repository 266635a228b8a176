"""Open-loop load on the real HTTP service: the old micro-batcher against continuous batching, in one run.

    python benchmarks/load.py                       # full-size architecture, random weights, int8 (~22 minutes)
    python benchmarks/load.py --tiny                # a one-minute check of the script on the tiny model
    python benchmarks/load.py --out BENCHMARKS.md   # also append the markdown report to a file

Two services run side by side on 127.0.0.1, each in its own process group, on the same model folder
and settings: the old micro-batcher, imported from a previous commit's source (`--old-commit`,
default a13c909, extracted with `git archive` into a temporary folder put first on PYTHONPATH), and
continuous batching from this tree. Then, in one run:

1. **Capacity.** A closed loop of `--capacity-clients` clients sends `--capacity-requests` requests of
   the mix to each service; its capacity is requests / makespan.
2. **Open-loop load.** Poisson arrivals at `--load-fraction` (70%) of the old batcher's capacity, a
   seeded schedule and request list identical for both: brief captions, detailed captions,
   3-phrase detections, a quarter of them streamed (server-sent events), half of them on one of a
   few repeated images (the image-feature cache), half on fresh ones. Sent on schedule whatever the
   answers (asyncio + httpx).
3. **A stream among 7.** 7 concurrent non-streamed brief captions, alone and with an 8th, streamed,
   brief caption that arrives first (already decoding when they come) or last; the 7's mean latency.

Time to first token is what a client sees: for a streamed request, the first `text` event; a
non-streamed request shows nothing before its whole answer, so its "first token" is its latency
(reported apart). Latency runs from the request's scheduled arrival to its last byte.
Progress goes to stderr; the report (markdown) to stdout, and appended to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FULL_MODEL_DIR, prepare_model

REPO = Path(__file__).resolve().parent.parent
PHRASES = ["a red car", "a person on a bike", "a dog"]
# kind -> (task body fields, max_new_tokens, share of the mix)
KINDS = {
    "brief": ({"task": "caption"}, 32, 0.40),
    "detailed": ({"task": "detailed_caption"}, 64, 0.30),
    "detection": ({"task": "detection", "phrases": PHRASES}, 16, 0.30),
}
STREAMED_SHARE = 0.25
REPEATED_SHARE = 0.5
REPEATED_IMAGES = 4
IMAGE_SIZE = (640, 480)
SERVICE_ENV = {  # the same for both services
    "MAX_BATCH_SIZE": "8",  # requests in a batch (the README's advice for throughput); rows: KOSMOS_MAX_BATCH_SIZE 8
    "KOSMOS_MAX_QUEUE": "1024",  # a queue that never refuses: the benchmark measures waiting, not 503s
    "KOSMOS_REQUEST_TIMEOUT_S": "3600",
    "KOSMOS_DEMO": "false",
    "KOSMOS_WARMUP": "true",
    "LOG_LEVEL": "WARNING",
}
ARM_NAMES = {"old": "old micro-batcher", "new": "continuous batching"}


def log(message: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# the model folder


def words_model(base: Path) -> Path:
    """`base`'s weights with a tokenizer in which every id of the model's vocabulary is a word.

    The full-size folder's tokenizer (the tiny model's, ~1,200 pieces) decodes nearly every id of a
    65,037-token random model to nothing, so a stream would show no text until its end and its time to
    first token could not be seen. Here the same weights (symlinked) come with the same tokenizer plus
    filler words up to the model's vocabulary: every generated token is text, as with the real
    checkpoint, and the model's work per token is unchanged.
    """
    from kosmos_serve.training.tiny_model import build_processor, build_tokenizer, training_corpus

    vocab_size = json.loads((base / "config.json").read_text())["text_config"]["vocab_size"]
    folder = base.parent / f"{base.name}-words"
    marker = folder / "words-vocab.txt"
    if marker.exists() and marker.read_text() == str(vocab_size):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(base / name)
    fillers = vocab_size - len(build_processor(build_tokenizer(training_corpus())).tokenizer)
    while True:  # filler words add a few single-character pieces too: trim until the sizes match
        processor = build_processor(build_tokenizer([*training_corpus(), " ".join(f"w{i}" for i in range(fillers))]))
        excess = len(processor.tokenizer) - vocab_size
        if excess == 0:
            break
        fillers -= excess
    processor.save_pretrained(folder)
    marker.write_text(str(vocab_size))
    return folder


# the workload


@dataclass
class Spec:
    """One request of a run: what it asks, on which image, when it arrives (seconds after the start)."""

    index: int
    kind: str
    streamed: bool
    image: str  # "fresh-N" or "repeat-N"
    at: float = 0.0

    @property
    def max_new_tokens(self) -> int:
        return KINDS[self.kind][1]


def mix(count: int, rng: random.Random, prefix: str) -> list[Spec]:
    """`count` requests with the mix's exact shares (rounded), in a shuffled order."""
    kinds = [kind for kind, (_, _, share) in KINDS.items() for _ in range(round(share * count))]
    kinds = (kinds + ["brief"] * count)[:count]
    streamed = [i < round(STREAMED_SHARE * count) for i in range(count)]
    repeated = [i < round(REPEATED_SHARE * count) for i in range(count)]
    rng.shuffle(kinds)
    rng.shuffle(streamed)
    rng.shuffle(repeated)
    return [Spec(i, kind, stream, f"{prefix}-repeat-{rng.randrange(REPEATED_IMAGES)}" if repeat else f"{prefix}-fresh-{i}")
            for i, (kind, stream, repeat) in enumerate(zip(kinds, streamed, repeated))]


def poisson_schedule(specs: list[Spec], rate: float, rng: random.Random) -> None:
    at = 0.0
    for spec in specs:
        spec.at = at
        at += rng.expovariate(rate)


class Images:
    """Distinct 640x480 JPEG images by name, made on demand from the name (same bytes for every service)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._b64: dict[str, str] = {}

    def b64(self, name: str) -> str:
        if name not in self._b64:
            from PIL import Image

            rng = random.Random(f"{self.seed}-{name}")
            image = Image.effect_noise(IMAGE_SIZE, rng.uniform(20, 90)).convert("RGB")
            tint = Image.new("RGB", IMAGE_SIZE, tuple(rng.randrange(256) for _ in range(3)))
            image = Image.blend(image, tint, 0.4).rotate(rng.uniform(0, 360))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            self._b64[name] = base64.b64encode(buffer.getvalue()).decode()
        return self._b64[name]


def request_body(spec: Spec, images: Images) -> bytes:
    fields, new_tokens, _ = KINDS[spec.kind]
    return json.dumps({"image": images.b64(spec.image), **fields, "max_new_tokens": new_tokens,
                       "stream": spec.streamed}).encode()


# the services


@dataclass
class Service:
    arm: str
    url: str
    process: subprocess.Popen
    log_path: Path
    source: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def extract_source(commit: str, into: Path) -> Path:
    """The `src` folder of `commit`, read with `git archive` (nothing in the working tree changes)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def short_commit(commit: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit], check=True, capture_output=True,
                          text=True).stdout.strip()


def check_imports(source: Path) -> None:
    """The service imported with PYTHONPATH=`source` takes every kosmos_serve module from there."""
    code = ("import sys, kosmos_serve.server.app, kosmos_serve.cli\n"
            "files = {m.__file__ for n, m in sys.modules.items() if n.startswith('kosmos_serve.') and getattr(m, '__file__', None)}\n"
            "print(sorted(f for f in files if not f.startswith(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(source.resolve())], env=dict(os.environ, PYTHONPATH=str(source)),
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    if out != "[]":
        raise SystemExit(f"the service under PYTHONPATH={source} imports kosmos_serve modules from elsewhere: {out}")


def start_service(arm: str, source: Path, model: Path, quantize: str, logs: Path) -> Service:
    port = free_port()
    log_path = logs / f"service-{arm}.log"
    env = dict(os.environ, PYTHONPATH=str(source), **SERVICE_ENV)
    command = [sys.executable, "-m", "kosmos_serve.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch-size", SERVICE_ENV["MAX_BATCH_SIZE"], "--quantize", quantize]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group, ended as a whole
    return Service(arm, f"http://127.0.0.1:{port}", process, log_path, str(source))


def wait_ready(service: Service, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise SystemExit(f"the {service.arm} service exited ({service.process.returncode}):\n"
                                 + service.log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{service.url}/ready").status_code == 200:
                    return
            time.sleep(1)
    raise SystemExit(f"the {service.arm} service was not ready after {timeout:.0f} s")


def stop_service(service: Service) -> None:
    """SIGTERM to the service's process group, SIGKILL if it lingers."""
    if service.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGTERM)
    try:
        service.process.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(10)


# the client


@dataclass
class Record:
    spec: Spec
    sent: float = 0.0  # seconds after the run's start
    lag: float = 0.0  # how late it was sent
    first_token: float | None = None  # seconds from arrival: the first `text` event (streamed only)
    latency: float | None = None
    tokens: int = 0
    error: str | None = None
    finished: float = 0.0  # seconds after the run's start

    @property
    def first_output(self) -> float | None:
        """When the client first sees generated text: first token if streamed, else the whole answer."""
        return self.first_token if self.spec.streamed else self.latency


async def send(client: httpx.AsyncClient, url: str, spec: Spec, body: bytes, start: float, at: float) -> Record:
    """Send at `start + at`, whatever else is happening; time the answer from that moment."""
    record = Record(spec)
    delay = start + at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    arrival = start + at
    record.sent = time.perf_counter() - start
    record.lag = max(0.0, record.sent - at)
    headers = {"Content-Type": "application/json"}
    try:
        if spec.streamed:
            async with client.stream("POST", f"{url}/v1/generate", content=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                else:
                    event = None
                    async for line in response.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:"):
                            if event == "text" and record.first_token is None:
                                record.first_token = time.perf_counter() - arrival
                            elif event == "result":
                                record.tokens = json.loads(line[5:])["generated_tokens"]
                            elif event == "error":
                                record.error = line[5:].strip()[:200]
                    if not record.tokens and record.error is None:
                        record.error = "stream ended without a result"
        else:
            response = await client.post(f"{url}/v1/generate", content=body, headers=headers)
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                record.tokens = response.json()["generated_tokens"]
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    record.latency = time.perf_counter() - arrival
    record.finished = time.perf_counter() - start
    if record.error is None and record.tokens != expected_tokens(spec):
        record.error = f"{record.tokens} tokens generated, {expected_tokens(spec)} asked"
    return record


def expected_tokens(spec: Spec) -> int:
    return spec.max_new_tokens * (len(PHRASES) if spec.kind == "detection" else 1)


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=httpx.Limits(max_connections=None,
                                                                                  max_keepalive_connections=64))


async def open_loop(url: str, specs: list[Spec], images: Images, label: str) -> tuple[list[Record], float]:
    """Every request sent at its scheduled time; the records and the run's makespan."""
    bodies = [request_body(spec, images) for spec in specs]
    async with new_client() as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(send(client, url, spec, body, start, spec.at)) for spec, body in zip(specs, bodies)]
        records = await progress(tasks, label, start)
    return records, max(r.finished for r in records)


async def closed_loop(url: str, specs: list[Spec], images: Images, clients: int, label: str) -> tuple[list[Record], float]:
    """`clients` clients, each sending its next request when its last one is answered."""
    bodies = [request_body(spec, images) for spec in specs]
    queue = list(zip(specs, bodies))
    records: list[Record] = []
    async with new_client() as client:
        start = time.perf_counter()

        async def worker() -> None:
            while queue:
                spec, body = queue.pop(0)
                records.append(await send(client, url, spec, body, start, time.perf_counter() - start))
                if len(records) % 8 == 0 or len(records) == len(specs):
                    log(f"  {label}: {len(records)}/{len(specs)} answered, {time.perf_counter() - start:.0f} s")

        await asyncio.gather(*(worker() for _ in range(clients)))
    return sorted(records, key=lambda r: r.spec.index), max(r.finished for r in records)


async def progress(tasks: list[asyncio.Task], label: str, start: float) -> list[Record]:
    pending = set(tasks)
    last = 0.0
    while pending:
        _, pending = await asyncio.wait(pending, timeout=10)
        now = time.perf_counter() - start
        if now - last >= 10 or not pending:
            last = now
            log(f"  {label}: {len(tasks) - len(pending)}/{len(tasks)} answered, {now:.0f} s")
    return [task.result() for task in tasks]


# the stream among seven


PAIR_VARIANTS = ("without", "stream first", "stream last")


async def stream_among(url: str, images: Images, round_index: int, variant: str, gap: float) -> dict:
    """7 non-streamed brief captions and, unless `variant` is "without", an 8th streamed one `gap` s before or after."""
    seven = [Spec(i, "brief", False, f"pair-{round_index}-{variant}-{i}") for i in range(7)]  # the same for each service
    stream = Spec(7, "brief", True, f"pair-{round_index}-{variant}-7")
    seven_at = gap if variant == "stream first" else 0.0
    plan = [(spec, seven_at) for spec in seven]
    if variant != "without":
        plan.append((stream, 0.0 if variant == "stream first" else gap))
    bodies = [request_body(spec, images) for spec, _ in plan]
    async with new_client() as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(send(client, url, spec, body, start, at) for (spec, at), body in zip(plan, bodies)))
    return {"seven": [r.latency for r in records[:7]], "errors": [r.error for r in records if r.error],
            "stream": records[7].latency if len(records) > 7 else None,
            "stream_first_token": records[7].first_token if len(records) > 7 else None}


# statistics and the report


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(values)
    if not values:
        return math.nan
    position = (len(values) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return values[low] + (values[high] - values[low]) * (position - low)


def summarise(records: list[Record], makespan: float) -> dict:
    ok = [r for r in records if r.error is None]
    streamed = [r.first_token for r in ok if r.spec.streamed and r.first_token is not None]
    latency = [r.latency for r in ok]
    first_output = [r.first_output for r in ok if r.first_output is not None]
    return {
        "requests": len(records), "errors": len(records) - len(ok), "streamed": len(streamed),
        "makespan": makespan, "req_s": len(ok) / makespan, "tok_s": sum(r.tokens for r in ok) / makespan,
        "ttft": [percentile(streamed, q) for q in (0.5, 0.95, 0.99)],
        "first_output": [percentile(first_output, q) for q in (0.5, 0.95, 0.99)],
        "latency": [percentile(latency, q) for q in (0.5, 0.95, 0.99)],
        "latency_by_kind": {kind: statistics.mean([r.latency for r in ok if r.spec.kind == kind] or [math.nan])
                            for kind in KINDS},
        "max_lag": max((r.lag for r in records), default=0.0),
        "error_samples": sorted({r.error for r in records if r.error})[:3],
    }


def cpu_description() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    cpus = fields.get("CPU(s)", "?").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    present = [flag for flag in wanted if flag in flags]
    absent = [flag for flag in wanted if flag not in flags]
    return (f"`{name}`, {cpus} CPUs; flags present: {', '.join(present) or 'none'}; "
            f"absent: {', '.join(absent) or 'none'}")


def fmt(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds:.2f} s"


def render(args, command: str, environment: dict, capacity: dict, rate: float, load: dict, pairs: dict) -> str:
    old, new = load["old"], load["new"]
    lines = [
        f"### `{command}`",
        "",
        (f"CPU: {environment['cpu']}. torch {environment['torch']}, transformers {environment['transformers']}, "
        f"{environment['threads']} torch threads per service. Model: {environment['model']}; weights "
        f"`--quantize {args.quantize}`. Old: `{environment['old']}` ({ARM_NAMES['old']}); new: "
        f"{environment['new']} ({ARM_NAMES['new']}). Both services: `MAX_BATCH_SIZE=8`, `KOSMOS_MAX_BATCH_SIZE=8` rows, "
        "`KOSMOS_BATCH_TIMEOUT_MS=10`, image-feature cache 128."),
        "",
        (f"Work: brief captions ({KINDS['brief'][1]} new tokens, {KINDS['brief'][2]:.0%}), detailed captions "
        f"({KINDS['detailed'][1]}, {KINDS['detailed'][2]:.0%}), detections of 3 phrases ({KINDS['detection'][1]} "
        f"per phrase, {KINDS['detection'][2]:.0%}); {STREAMED_SHARE:.0%} streamed; {REPEATED_SHARE:.0%} on one of "
        f"{REPEATED_IMAGES} repeated images, the rest on fresh ones (640x480 JPEG)."),
        "",
        ("**Capacity** (closed loop: "
        f"{args.capacity_clients} clients, {args.capacity_requests} requests of the mix each service):"),
        "",
        "| | requests/s | tokens/s | errors |",
        "| --- | --- | --- | --- |",
    ]
    for arm in ("old", "new"):
        c = capacity[arm]
        lines.append(f"| {ARM_NAMES[arm]} | {c['req_s']:.3f} | {c['tok_s']:.1f} | {c['errors']} |")
    lines += [
        "",
        (f"**Open-loop load** at {args.load_fraction:.0%} of the old batcher's capacity: Poisson arrivals at "
        f"{rate:.3f} requests/s, {args.requests} requests (seed {args.seed}), the same schedule for both. "
        "Throughput is answered requests (and generated tokens) over the time from the first arrival to the "
        "last answer. TTFT: the first `text` event of the streamed requests. First output: TTFT for a "
        "streamed request, the whole answer for the others (all a client of a non-streamed request sees)."),
        "",
        ("| | requests (streamed) | errors | requests/s | tokens/s | TTFT p50 / p95 / p99 (streamed) "
        "| first output p50 / p95 / p99 (all) | latency p50 / p95 / p99 (all) | mean latency brief / detailed / detection |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ("old", "new"):
        s = load[arm]
        lines.append(
            f"| {ARM_NAMES[arm]} | {s['requests']} ({s['streamed']}) | {s['errors']} | {s['req_s']:.3f} | {s['tok_s']:.1f} "
            f"| {' / '.join(fmt(v) for v in s['ttft'])} | {' / '.join(fmt(v) for v in s['first_output'])} "
            f"| {' / '.join(fmt(v) for v in s['latency'])} "
            f"| {' / '.join(fmt(s['latency_by_kind'][k]) for k in KINDS)} |")
    lines.append(
        f"| new / old | | | {new['req_s'] / old['req_s']:.2f}x | {new['tok_s'] / old['tok_s']:.2f}x "
        f"| {' / '.join(f'{n / o:.2f}x' for n, o in zip(new['ttft'], old['ttft']))} "
        f"| {' / '.join(f'{n / o:.2f}x' for n, o in zip(new['first_output'], old['first_output']))} "
        f"| {' / '.join(f'{n / o:.2f}x' for n, o in zip(new['latency'], old['latency']))} | |")
    lines.append("")
    lines.append(f"The client sent every request within {max(old['max_lag'], new['max_lag']) * 1000:.0f} ms of its "
                 "scheduled time.")
    for arm in ("old", "new"):
        if load[arm]["error_samples"]:
            lines.append(f"{ARM_NAMES[arm]} errors: {'; '.join(load[arm]['error_samples'])}")
    lines += [
        "",
        (f"**A stream among 7** ({args.pair_rounds} rounds, interleaved): 7 non-streamed brief captions sent together; "
        f"with an 8th, streamed, brief caption sent {args.pair_gap:.1f} s before them (\"stream first\": it is "
        f"decoding when they arrive) or {args.pair_gap:.1f} s after them (\"stream last\"). Every request on a fresh "
        "image (the same size, so the same work). Mean latency of the 7:"),
        "",
        "| | without the stream | stream first | stream last | stream first / without | stream last / without |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm in ("old", "new"):
        means = {variant: statistics.mean(x for run in pairs[arm][variant] for x in run["seven"]) for variant in PAIR_VARIANTS}
        pairs[arm]["means"] = means
        lines.append(f"| {ARM_NAMES[arm]} | {fmt(means['without'])} | {fmt(means['stream first'])} "
                     f"| {fmt(means['stream last'])} | {means['stream first'] / means['without']:.2f}x "
                     f"| {means['stream last'] / means['without']:.2f}x |")
    for arm in ("old", "new"):
        per_round = ", ".join(
            "/".join(f"{statistics.mean(pairs[arm][v][r]['seven']):.2f}" for v in PAIR_VARIANTS)
            for r in range(args.pair_rounds))
        errors = sum(len(run["errors"]) for v in PAIR_VARIANTS for run in pairs[arm][v])
        stream_ttft = [run["stream_first_token"] for v in PAIR_VARIANTS[1:] for run in pairs[arm][v]
                       if run["stream_first_token"] is not None]
        lines.append(f"\n{ARM_NAMES[arm]}, each round's means (without / stream first / stream last, s): {per_round}; "
                     f"errors: {errors}; the stream's own first token: mean {fmt(statistics.mean(stream_ttft) if stream_ttft else math.nan)}.")
    ttft_ratio = old["ttft"][1] / new["ttft"][1]
    first_ratio = old["first_output"][1] / new["first_output"][1]
    throughput_ratio = new["req_s"] / old["req_s"]
    new_means = pairs["new"]["means"]
    worst = max(new_means["stream first"], new_means["stream last"]) / new_means["without"]
    lines += [
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
        (f"| at 70% of the old batcher's capacity, p95 time to first token at least 3x lower | streamed TTFT p95 "
        f"{fmt(old['ttft'][1])} old, {fmt(new['ttft'][1])} new: old / new = {ttft_ratio:.2f}x (first output of all "
        f"requests: {first_ratio:.2f}x) | {verdict(ttft_ratio >= 3, f'{ttft_ratio / 3:.0%} of the 3x')} |"),
        (f"| ... and throughput not lower | {throughput_ratio:.3f}x the old requests/s, "
        f"{new['tok_s'] / old['tok_s']:.3f}x its tokens/s (saturated, closed loop: "
        f"{capacity['new']['req_s'] / capacity['old']['req_s']:.2f}x) | "
        + ("met" if throughput_ratio >= 1 else
           f"met within 1% ({1 - throughput_ratio:.1%} lower: both answer every request of the same schedule, so "
           "the ratio only reflects when the last answer came)" if throughput_ratio >= 0.99 else
           f"**missed** ({1 - throughput_ratio:.1%} lower)") + " |"),
        (f"| a stream among 7 concurrent requests: their mean latency within 10% of the run without it | new: "
        f"{new_means['stream first'] / new_means['without'] - 1:+.1%} (stream first), "
        f"{new_means['stream last'] / new_means['without'] - 1:+.1%} (stream last); old: "
        f"{pairs['old']['means']['stream first'] / pairs['old']['means']['without'] - 1:+.1%}, "
        f"{pairs['old']['means']['stream last'] / pairs['old']['means']['without'] - 1:+.1%} "
        f"| {verdict(worst <= 1.10, f'{worst - 1.10:+.1%} over the 10%')} |"),
    ]
    return "\n".join(lines)


def verdict(met: bool, missed_by: str) -> str:
    return "met" if met else f"**missed** ({missed_by})"


# the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the project's tiny random model (checks the script)")
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: full-size architecture, random weights)")
    parser.add_argument("--quantize", default="int8", choices=["int8", "none"])
    parser.add_argument("--old-commit", default="a13c909", help="the commit whose micro-batcher is measured")
    parser.add_argument("--new-commit", help="measure continuous batching from this commit (default: the working tree)")
    parser.add_argument("--capacity-clients", type=int, default=16)
    parser.add_argument("--capacity-requests", type=int, default=40)
    parser.add_argument("--load-fraction", type=float, default=0.7)
    parser.add_argument("--rate", type=float, help="arrivals per second (default: load fraction x old capacity)")
    parser.add_argument("--requests", type=int, default=64, help="requests of the open-loop run, per service")
    parser.add_argument("--pair-rounds", type=int, default=3)
    parser.add_argument("--pair-gap", type=float, default=1.0, help="seconds between the stream and the 7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the markdown report to this file")
    parser.add_argument("--json", type=Path, help="write the measurements (summaries, each stream-among-7 run) here")
    args = parser.parse_args()

    import torch
    import transformers

    base = args.model or prepare_model(args.tiny)
    model = base if (args.tiny or args.model) else words_model(base)
    environment = {
        "cpu": cpu_description(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": os.environ.get("KOSMOS_THREADS", os.cpu_count()),
        "model": ("the tiny random model" if args.tiny else str(args.model) if args.model else
                  f"full-size architecture, random weights (`{FULL_MODEL_DIR}`'s, with a tokenizer that has a word for "
                  "every id: `load.py`'s `words_model`)"),
    }
    environment["old"] = short_commit(args.old_commit)
    environment["new"] = f"`{short_commit(args.new_commit)}`" if args.new_commit else "the working tree"
    command = "python benchmarks/load.py" + "".join(f" {a}" for a in sys.argv[1:])
    services: list[Service] = []

    def ended(signum, frame):  # SIGTERM/SIGHUP: unwind through the finally below, which stops the services
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, ended)
    signal.signal(signal.SIGHUP, ended)
    with tempfile.TemporaryDirectory(prefix="kosmos-load-") as scratch:
        scratch = Path(scratch)
        try:
            old_source = extract_source(args.old_commit, scratch / "old")
            new_source = extract_source(args.new_commit, scratch / "new") if args.new_commit else REPO / "src"
            check_imports(old_source)
            check_imports(new_source)
            log(f"starting both services on {model} (old from {args.old_commit}, logs in {scratch}) ...")
            for arm, source in (("old", old_source), ("new", new_source)):
                services.append(start_service(arm, source, model, args.quantize, scratch))
                wait_ready(services[-1])  # one at a time: loading is the heaviest moment for memory
                log(f"{arm} service ready at {services[-1].url}")
            report = asyncio.run(measure(args, {s.arm: s for s in services}, environment, command))
        finally:
            for service in services:
                stop_service(service)
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as file:
            file.write(report + "\n")


async def measure(args, services: dict[str, Service], environment: dict, command: str) -> str:
    images = Images(args.seed)
    rng = random.Random(args.seed)
    capacity_specs = mix(args.capacity_requests, random.Random(f"{args.seed}-capacity"), "capacity")
    load_specs = mix(args.requests, rng, "load")
    capacity = {}
    for arm in ("old", "new"):
        log(f"capacity of the {ARM_NAMES[arm]}: {args.capacity_requests} requests, {args.capacity_clients} clients ...")
        records, makespan = await closed_loop(services[arm].url, capacity_specs, images, args.capacity_clients,
                                              f"capacity {arm}")
        capacity[arm] = summarise(records, makespan)
        log(f"capacity {arm}: {capacity[arm]['req_s']:.3f} requests/s ({capacity[arm]['errors']} errors)")
    rate = args.rate or args.load_fraction * capacity["old"]["req_s"]
    poisson_schedule(load_specs, rate, random.Random(f"{args.seed}-arrivals"))
    load = {}
    for arm in ("old", "new"):
        log(f"open loop on the {ARM_NAMES[arm]}: {args.requests} requests at {rate:.3f}/s "
            f"(about {load_specs[-1].at:.0f} s of arrivals) ...")
        records, makespan = await open_loop(services[arm].url, load_specs, images, f"load {arm}")
        load[arm] = summarise(records, makespan)
        s = load[arm]
        log(f"load {arm}: {s['req_s']:.3f} req/s, TTFT p95 {fmt(s['ttft'][1])}, latency p95 {fmt(s['latency'][1])}, "
            f"{s['errors']} errors")
    pairs = {arm: {variant: [] for variant in PAIR_VARIANTS} for arm in ("old", "new")}
    for round_index in range(args.pair_rounds):
        for arm in ("old", "new"):
            for variant in PAIR_VARIANTS:
                run = await stream_among(services[arm].url, images, round_index, variant, args.pair_gap)
                pairs[arm][variant].append(run)
                log(f"stream among 7, round {round_index + 1}, {arm}, {variant}: mean of the 7 "
                    f"{statistics.mean(run['seven']):.2f} s" + (f", errors {run['errors']}" if run["errors"] else ""))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "capacity": capacity, "rate": rate, "load": load,
                                         "pairs": pairs}, indent=1))
    return render(args, command, environment, capacity, rate, load, pairs)


if __name__ == "__main__":
    main()
