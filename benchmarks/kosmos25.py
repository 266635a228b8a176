"""Kosmos-2.5 reading a page: transformers' reference code and kosmos-serve side by side, on one machine, in one run.

    python benchmarks/kosmos25.py                   # full-size Kosmos-2.5 architecture, random weights
    python benchmarks/kosmos25.py --tiny            # a quick check of the script on the tiny Kosmos-2.5

The work: a 1024x1024 rendering of text (a different page for every request, so no image feature is reused), task
`ocr` (prompt `<ocr>`), exactly `--new-tokens` new tokens. Random weights may choose the end-of-sequence token
early, so both sides suppress it the same way: the model's generation config gets `suppress_tokens=[eos]`, which
transformers' `generate` and the engine (it builds transformers' own logits processors from that config) both turn
into a `SuppressTokensLogitsProcessor`. Each configuration runs in its own process (peak memory is its own):

- `reference`: the model doc's code, float32: the processor, `generate`, `batch_decode` and its `<ocr>`
  post-processing, one request at a time. Its first token and decode step are read from a logits processor that
  notes when each token's logits arrive. With 8 clients the reference serves them one after another, so its
  throughput is one over a request's time (as benchmarks/bench.py counts the model-card code).
- `none`, `auto` (`--formats`): the kosmos-serve engine with that `--quantize`. One request alone through the
  scheduler, step by step (the first step is vision, prefill and the first token); then 8 requests at once,
  which the engine batches (8 pages of 4096 patches each, then 8 rows decoding together). The one-request
  figures are also written to `$TMPDIR/kosmos25-bench-<config>-one-request.json` as soon as they are measured, so
  a run stopped during the batch keeps them.

The CPU (`lscpu`'s model name and flags), the load average before and after, and resident memory head and fill the
report. Results print as markdown (`--out FILE` appends them there); `--json FILE` writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FULL_MODEL_DIR = Path.home() / ".cache" / "kosmos-serve" / "full-size-random-kosmos25"
TINY_MODEL_DIR = Path("/tmp/kosmos-serve-bench-tiny-kosmos25")
PAGE_SIZE = 1024
PROMPT = "<ocr>"
BOX = r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>"  # the model doc's pattern
EXTENSIONS = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run on the tiny random Kosmos-2.5 (checks the script)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8, help="requests at once for throughput")
    parser.add_argument("--formats", default="none,auto", help="kosmos-serve --quantize settings to measure")
    parser.add_argument("--out", type=Path, help="append the markdown report to this file")
    parser.add_argument("--json", type=Path, help="write the raw numbers to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    model_dir = prepare_model(args.tiny)
    machine = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "load_before": load_average()}
    rows = []
    for config in ["reference", *args.formats.split(",")]:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--worker", config, "--model", str(model_dir),
                   "--new-tokens", str(args.new_tokens), "--clients", str(args.clients)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    machine["load_after"] = load_average()
    report = render(rows, machine, args, " ".join(sys.argv[1:]))
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as file:
            file.write(report + "\n")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1), encoding="utf-8")


def prepare_model(tiny: bool) -> Path:
    """The model folder: the tiny Kosmos-2.5, or the full-size architecture with random weights (built once).

    The full-size one is `Kosmos2_5Config()` (transformers' defaults: the checkpoint's sizes, a vocabulary of 108481)
    with the tiny model's tokenizer (the family's tokens, a byte-level alphabet); its ids all fall inside the model's
    vocabulary, and ids the tokenizer lacks decode to nothing.
    """
    from kosmos_serve.training.tiny_kosmos25 import build_tiny_kosmos25, build_tokenizer

    if tiny:
        return TINY_MODEL_DIR if (TINY_MODEL_DIR / "config.json").exists() else build_tiny_kosmos25(TINY_MODEL_DIR)
    if not (FULL_MODEL_DIR / "config.json").exists():
        from transformers import Kosmos2_5Config, Kosmos2_5ForConditionalGeneration, Kosmos2_5Processor
        from transformers.models.kosmos2_5.image_processing_pil_kosmos2_5 import Kosmos2_5ImageProcessorPil

        print(f"building the full-size Kosmos-2.5 with random weights in {FULL_MODEL_DIR} ...", file=sys.stderr)
        config = Kosmos2_5Config()
        tokenizer = build_tokenizer()
        assert len(tokenizer) <= config.text_config.vocab_size
        torch.manual_seed(0)
        Kosmos2_5ForConditionalGeneration(config).save_pretrained(FULL_MODEL_DIR)
        Kosmos2_5Processor(Kosmos2_5ImageProcessorPil(), tokenizer,
                           num_image_tokens=config.latent_query_num).save_pretrained(FULL_MODEL_DIR)
    return FULL_MODEL_DIR


def cpu_description() -> str:
    """`lscpu`'s model name, and which of the vector and matrix extensions that pick kernels its flags list."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = set(fields.get("Flags", "").split())
    return (f"{model}, {fields.get('CPU(s)', '?').strip()} CPUs ({', '.join(e for e in EXTENSIONS if e in flags)}; "
            f"no {', '.join(e for e in EXTENSIONS if e not in flags) or '-'}; torch sees "
            f"{torch.backends.cpu.get_cpu_capability()})")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def pages(count: int, seed: int):
    """`count` distinct 1024x1024 renderings of text: lines of words in black on white, a different text each."""
    from PIL import Image, ImageDraw, ImageFont

    words = ["invoice", "total", "amount", "date", "receipt", "payment", "account", "number", "customer", "address",
             "order", "item", "price", "quantity", "balance", "due", "tax", "subtotal", "reference", "page", "report",
             "summary"]
    font = ImageFont.load_default(size=28)
    rendered = []
    for index in range(count):
        page = Image.new("RGB", (PAGE_SIZE, PAGE_SIZE), "white")
        draw = ImageDraw.Draw(page)
        for line in range(24):
            state = seed * 7919 + index * 131 + line * 17
            text = " ".join(words[(state * (k + 3) + k) % len(words)] for k in range(5)) + f" {state % 10000:04d}"
            draw.text((48, 40 + 40 * line), text, fill="black", font=font)
        rendered.append(page)
    return rendered


def resident_gib() -> float:
    """Memory resident now (a memory-mapped checkpoint counts only for the pages read so far)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1024**3


def suppress_eos(model) -> int:
    """Make the model's generation configs suppress end-of-sequence (every request runs to its token budget)."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    for config in (model.generation_config, model.text_model.generation_config):
        config.suppress_tokens = [eos]
    return eos


def run_worker(args) -> dict:
    torch.manual_seed(0)
    result = measure_reference(args) if args.worker == "reference" else measure_engine(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["config"] = args.worker
    return result


def doc_post_process(decoded: str, scale_height: float, scale_width: float) -> list:
    """The model doc's `<ocr>` post-processing: each box and the text up to the next one, scaled to the image."""
    text = decoded.replace(PROMPT, "")
    boxes = [[int(number) for number in re.findall(r"\d+", box)] for box in re.findall(BOX, text)]
    lines = []
    for (x0, y0, x1, y1), line in zip(boxes, re.split(BOX, text)[1:]):
        if not (x0 >= x1 or y0 >= y1):
            lines.append((int(x0 * scale_width), int(y0 * scale_height), int(x1 * scale_width),
                          int(y1 * scale_height), line))
    return lines


def measure_reference(args) -> dict:
    """The model doc's code in float32, one request at a time."""
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    class Stamps(LogitsProcessor):
        """Notes when each token's logits arrive (it changes nothing)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    suppress_eos(model)
    loaded_rss = resident_gib()
    page = pages(1, seed=1)[0]

    with torch.inference_mode():
        stamps = Stamps()
        began = time.perf_counter()
        inputs = processor(text=PROMPT, images=page, return_tensors="pt")
        height, width = inputs.pop("height"), inputs.pop("width")
        generated = model.generate(**inputs, max_new_tokens=args.new_tokens, logits_processor=LogitsProcessorList(
            [stamps]))
        decoded = processor.batch_decode(generated, skip_special_tokens=True)[0]
        doc_post_process(decoded, page.height / height, page.width / width)
        whole = time.perf_counter() - began
    new_tokens = generated.shape[1] - inputs["input_ids"].shape[1]
    first_token = stamps.times[0] - began
    return {"request_s": whole, "first_token_s": first_token, "new_tokens": int(new_tokens),
            "decode_step_s": (stamps.times[-1] - stamps.times[0]) / max(1, len(stamps.times) - 1),
            "throughput_rps": 1 / whole, "loaded_rss_gib": loaded_rss, "weight_formats": {"vision": "float32",
                                                                                         "text": "float32"}}


def measure_engine(args) -> dict:
    """kosmos-serve's engine: one request alone, step by step; then `--clients` requests at once."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, ImageFeatureCache, Request
    from kosmos_serve.tasks import Task, TaskInput

    engine = Engine(EngineSettings(model=str(args.model), device="cpu", quantize=args.worker,
                                   max_batch_rows=args.clients))
    suppress_eos(engine.model)
    engine.cache = ImageFeatureCache(0)  # every page is encoded: nothing is reused
    loaded_rss = resident_gib()
    params = GenerationParams(max_new_tokens=args.new_tokens)

    scheduler = engine.scheduler()
    began = time.perf_counter()
    scheduler.add(Request(pages(1, seed=1)[0], TaskInput(Task.OCR), params))
    scheduler.step()  # vision, prefill and the first token
    first_token = time.perf_counter() - began
    steps = 0
    while scheduler.busy:
        scheduler.step()
        steps += 1
    whole = time.perf_counter() - began
    one = {"request_s": whole, "first_token_s": first_token, "decode_step_s": (whole - first_token) / max(1, steps),
           "new_tokens": steps + 1, "loaded_rss_gib": loaded_rss, "weight_formats": engine.model.weight_formats}
    # kept at once, so a run stopped during the (long) batch still has its one-request figures
    (Path(tempfile.gettempdir()) / f"kosmos25-bench-{args.worker}-one-request.json").write_text(json.dumps(one))

    batch = [Request(page, TaskInput(Task.OCR), params) for page in pages(args.clients, seed=2)]
    began = time.perf_counter()
    results = engine.run(batch)
    batched = time.perf_counter() - began
    return {**one, "clients_s": batched, "throughput_rps": len(batch) / batched,
            "clients_new_tokens": [result.generated_tokens for result in results]}


def render(rows: list[dict], machine: dict, args, command: str) -> str:
    reference = rows[0]
    lines = [
        f"`python benchmarks/kosmos25.py {command}`".replace(" `", "`"),
        "",
        f"- CPU: {machine['cpu']}; torch threads: {machine['threads']}",
        f"- load average (1, 5, 15 min) before: {machine['load_before']}, after: {machine['load_after']}",
        (f"- work: a {PAGE_SIZE}x{PAGE_SIZE} page of rendered text, `{PROMPT}`, {args.new_tokens} new tokens "
         "(end-of-sequence suppressed on both sides); "
         f"{args.clients} clients: the reference one after another, the engine batching them"),
        "",
        (f"| configuration | weights (vision / text) | 1 request | first token | decode step | {args.clients} clients "
         "| throughput | vs reference | resident after load | peak resident |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        formats = f"{row['weight_formats']['vision']} / {row['weight_formats']['text']}"
        clients = row.get("clients_s", args.clients * row["request_s"])
        lines.append(
            f"| {row['config']} | {formats} | {row['request_s']:.1f} s | {row['first_token_s']:.2f} s | "
            f"{1000 * row['decode_step_s']:.0f} ms | {clients:.1f} s | {60 * row['throughput_rps']:.2f} pages/min | "
            f"{row['throughput_rps'] / reference['throughput_rps']:.2f}x "
            f"({reference['request_s'] / row['request_s']:.2f}x per request) | {row['loaded_rss_gib']:.1f} GiB | "
            f"{row['peak_rss_gib']:.1f} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
