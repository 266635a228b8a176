"""Side-by-side speed of the model-card code and kosmos-serve, on one machine, in one run.

    python benchmarks/bench.py                      # full-size Kosmos-2 architecture, random weights
    python benchmarks/bench.py --model DIR          # a real checkpoint folder instead
    python benchmarks/bench.py --tiny               # a quick check of the script on the tiny model
    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/bench.py                  # an AVX-512 machine's libraries capped to AVX2 (the report says so)

Each configuration runs in its own process (so peak memory is its own): the model-card code
(transformers' `generate` + `post_process_generation`, one request at a time, float32), then the
kosmos-serve engine in each weight format (`--formats`: fp32, int8 and auto), alone and behind its
real HTTP service. The CPU model and its vector and matrix extensions head the report. The machine's
memory bandwidth and matrix-product rate are measured in the same run and give the floors:
decode reads every text weight once per step; vision and prefill are bound by arithmetic.
Results print as a markdown table (`--out FILE` appends it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VISION_GFLOP = 156.0  # the full-size vision encoder on one 224x224 image
TEXT_GFLOP_PER_TOKEN = 2 * 1.34  # the full-size text decoder, per prompt token
FULL_MODEL_DIR = Path.home() / ".cache" / "kosmos-serve" / "full-size-random"
CAPTION = "<grounding> An image of"
AGREEMENT_PROMPTS = 4  # fresh images whose greedy tokens each format must reproduce from fp32
EXTENSIONS = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]  # /proc/cpuinfo flags
# Settings that cap the instruction sets the kernel libraries use, to measure a smaller CPU kind on a larger one:
# ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
ISA_CAPS = ["ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: full-size architecture, random weights)")
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random model (checks the script)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--formats", default="fp32,int8,int4,auto", help="kosmos-serve --quantize settings to "
                        "measure (fp32 is none)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent HTTP clients to measure throughput with")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per measurement (median)")
    parser.add_argument("--out", type=Path, help="append the markdown report to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    model_dir = args.model or prepare_model(args.tiny)
    machine = measure_machine()
    rows = []
    for config in ["model-card", *args.formats.split(",")]:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--worker", config, "--model", str(model_dir),
                   "--new-tokens", str(args.new_tokens), "--clients", args.clients, "--repeats", str(args.repeats)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    report = render(rows, machine, args, " ".join(sys.argv[1:]))
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as file:
            file.write(report + "\n")


def prepare_model(tiny: bool) -> Path:
    """The model folder: the tiny model, or the full-size architecture with random weights (built once)."""
    from kosmos_serve.training.tiny_model import build_processor, build_tiny_model, build_tokenizer, training_corpus

    if tiny:
        return build_tiny_model(Path("/tmp/kosmos-serve-bench-tiny"))
    if not (FULL_MODEL_DIR / "config.json").exists():
        from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

        print(f"building the full-size architecture with random weights in {FULL_MODEL_DIR} ...", file=sys.stderr)
        torch.manual_seed(0)
        model = Kosmos2ForConditionalGeneration(Kosmos2Config())
        model.save_pretrained(FULL_MODEL_DIR)
        build_processor(build_tokenizer(training_corpus())).save_pretrained(FULL_MODEL_DIR)
    return FULL_MODEL_DIR


def measure_machine() -> dict:
    """Memory bandwidth as decode sees it (a matrix-vector product over 1 GiB) and the best float32 matrix-product rate."""
    matrix, vector = torch.randn(16384, 16384), torch.randn(16384)
    matrix @ vector
    began = time.perf_counter()
    for _ in range(5):
        matrix @ vector
    bandwidth = 5 * matrix.numel() * 4 / (time.perf_counter() - began)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    began = time.perf_counter()
    for _ in range(5):
        a @ b
    flops = 5 * 2 * 2048**3 / (time.perf_counter() - began)
    return {"bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": flops / 1e9, "threads": torch.get_num_threads(),
            "cpu": cpu_description()}


def cpu_description() -> str:
    """The CPU model and the vector and matrix extensions that decide which kernels are fastest."""
    from kosmos_serve.engine.kernels import cpu_features

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = cpu_features()
    shown = [name for name in EXTENSIONS if name in flags]
    caps = [f"{name}={os.environ[name]}" for name in ISA_CAPS if os.environ.get(name)]
    return (f"{model} ({', '.join(shown) or 'none of ' + ', '.join(EXTENSIONS)}; no "
            f"{', '.join(name for name in EXTENSIONS if name not in flags) or '-'}; torch sees "
            f"{torch.backends.cpu.get_cpu_capability()})"
            + (f", instruction sets capped by {' '.join(caps)}" if caps else ""))


def fresh_images(count: int, seed: int):
    """Distinct 640x480 images, so no request finds its features cached."""
    from PIL import Image

    return [Image.effect_noise((640, 480), 40 + (seed * 37 + index) % 50).convert("RGB").rotate(index)
            for index in range(count)]


def resident_gib() -> float:
    """Memory resident now (a memory-mapped checkpoint counts only for the pages read so far)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1024**3


def timed(work) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def median_time(work, repeats: int) -> float:
    return statistics.median(timed(work) for _ in range(repeats))


def run_worker(args) -> dict:
    torch.manual_seed(0)
    if args.worker == "model-card":
        result = measure_model_card(args)
    else:
        result = measure_engine(args)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["config"] = args.worker
    return result


def measure_model_card(args) -> dict:
    """The model card's code, one request at a time."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    from kosmos_serve.engine import image_features

    model = Kosmos2ForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    loaded_rss = resident_gib()
    images = iter(fresh_images(4 * args.repeats + 2, seed=1))

    def request(new_tokens):
        image = next(images)
        inputs = processor(text=CAPTION, images=image, return_tensors="pt")
        generated = model.generate(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"], image_embeds=None,
            image_embeds_position_mask=inputs["image_embeds_position_mask"], use_cache=True,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )
        text = processor.batch_decode(generated, skip_special_tokens=True)[0]
        processor.post_process_generation(text)

    with torch.inference_mode():
        request(2)  # warm-up
        pixels = processor(text=CAPTION, images=next(images), return_tensors="pt")["pixel_values"]
        vision = median_time(lambda: image_features(model, pixels), args.repeats)
        first_token = median_time(lambda: request(1), args.repeats)
        whole = median_time(lambda: request(args.new_tokens), args.repeats)
    return {"vision_s": vision, "first_token_s": first_token, "request_s": whole,
            "decode_step_s": (whole - first_token) / (args.new_tokens - 1),
            "throughput": {str(clients): 1 / whole for clients in args.clients.split(",")},
            "text_weight_bytes": text_weight_bytes(model), "loaded_rss_gib": loaded_rss}


def measure_engine(args) -> dict:
    """kosmos-serve: the engine alone, then behind its HTTP service."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.tasks import Task, TaskInput

    engine = Engine(EngineSettings(model=str(args.model), device="cpu", quantize=args.worker.replace("fp32", "none"),
                                   max_batch_rows=8, image_cache_size=1024))
    images = iter(fresh_images(100, seed=2))
    caption, question = TaskInput(Task.CAPTION), TaskInput(Task.GROUNDED_VQA, prompt="What is in the picture?")

    def request(new_tokens, image=None, task=caption):
        params = GenerationParams(max_new_tokens=new_tokens, no_repeat_ngram_size=0)
        return engine.run([Request(image or next(images), task, params)])[0]

    loaded_rss = resident_gib()
    request(2)  # warm-up
    vision = median_time(lambda: engine.encode_images([next(images)]), args.repeats)
    first_token = median_time(lambda: request(1), args.repeats)
    seen = [next(images) for _ in range(args.repeats)]
    for image in seen:
        request(1, image)
    seen_iter = iter(seen)
    second_question = median_time(lambda: request(1, next(seen_iter), question), args.repeats)
    fresh_question = median_time(lambda: request(1, task=question), args.repeats)
    whole = median_time(lambda: request(args.new_tokens), args.repeats)
    decode_step = statistics.median(decode_step_time(engine, Request(next(images), caption, GenerationParams(
        max_new_tokens=args.new_tokens, no_repeat_ngram_size=0))) for _ in range(args.repeats))
    tokens = request(args.new_tokens).generated_tokens
    greedy = [engine.processor.tokenizer(request(args.new_tokens, image).raw_text, add_special_tokens=False).input_ids
              for image in fresh_images(AGREEMENT_PROMPTS, seed=3)]
    http = measure_http(engine, images, args)
    return {"vision_s": vision, "first_token_s": first_token, "request_s": whole,
            "decode_step_s": decode_step, "generated_tokens": tokens,
            "second_question_first_token_s": second_question, "fresh_question_first_token_s": fresh_question,
            "text_weight_bytes": text_weight_bytes(engine.model), "greedy_tokens": greedy, "loaded_rss_gib": loaded_rss,
            "weight_formats": engine.model.weight_formats, **http}


def decode_step_time(engine, request) -> float:
    """Seconds per decode step of one request alone, timed step by step after its first token."""
    scheduler = engine.scheduler()
    scheduler.add(request)
    scheduler.step()  # vision, prefill and the first token
    steps, began = 0, time.perf_counter()
    while scheduler.busy:
        scheduler.step()
        steps += 1
    return (time.perf_counter() - began) / steps


def measure_http(engine, images, args) -> dict:
    """One request through the real service vs the engine alone, and throughput with concurrent clients."""
    import base64
    import concurrent.futures
    import io

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' loopback server helper
    from local_server import serve_in_thread

    from kosmos_serve.asgi import create_app
    from kosmos_serve.config import ServerSettings
    from kosmos_serve.engine import GenerationParams, Request
    from kosmos_serve.tasks import Task, TaskInput

    def body(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"image": base64.b64encode(buffer.getvalue()).decode(), "max_new_tokens": args.new_tokens}

    def engine_request(image):
        params = GenerationParams(max_new_tokens=args.new_tokens, no_repeat_ngram_size=0)
        engine.run([Request(image, TaskInput(Task.CAPTION), params)])

    app = create_app(ServerSettings(max_batch_requests=8, batch_timeout_ms=20, demo=False), engine.settings, engine=engine)
    throughput = {}
    with serve_in_thread(app) as url, httpx.Client(timeout=3600) as client:  # yields once /ready answers 200
        alone, over_http = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same machine
            alone.append(timed(lambda: engine_request(next(images))))
            request_body = body(next(images))
            over_http.append(timed(lambda b=request_body: client.post(f"{url}/v1/generate", json=b)))
        for clients in map(int, args.clients.split(",")):
            batch = [body(next(images)) for _ in range(clients)]
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                began = time.perf_counter()
                list(pool.map(lambda b: client.post(f"{url}/v1/generate", json=b), batch))
                elapsed = time.perf_counter() - began
            throughput[str(clients)] = clients / elapsed
    one_http = statistics.median(over_http)
    return {"http_request_s": one_http, "engine_request_s": statistics.median(alone), "throughput": throughput}


def text_weight_bytes(model) -> int:
    """Bytes of the text decoder's matrices read once per decode step (the output layer included)."""
    total = 0
    for module in model.text_model.modules():
        if hasattr(module, "weight_bytes"):  # packed int4 weights, with their scales and offsets
            total += module.weight_bytes
            continue
        weight = getattr(module, "weight", None)
        if callable(weight):  # a quantized linear layer
            weight = weight()
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding):
            total += weight.numel() * weight.element_size()
    return total


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of reference tokens reproduced before the first difference, over all prompts."""
    same = 0
    for mine, theirs in zip(tokens, reference):
        for a, b in zip(mine, theirs):
            if a != b:
                break
            same += 1
    return same / sum(len(theirs) for theirs in reference)


def render(rows: list[dict], machine: dict, args, command: str) -> str:
    """The report: one row per configuration, with ratios to the model-card code and to the floors."""
    base = rows[0]
    bandwidth, rate = machine["bandwidth_gb_s"] * 1e9, machine["matmul_gflop_s"]
    prompt_tokens = 64 + 8  # image tokens plus the caption prompt's
    lines = [
        f"### `{f'python benchmarks/bench.py {command}'.strip()}`",
        "",
        (f"Machine: {machine['cpu']}, {machine['threads']} threads; memory bandwidth "
         f"{machine['bandwidth_gb_s']:.1f} GB/s, float32 matrix products {machine['matmul_gflop_s']:.0f} GFLOP/s "
         f"(measured in this run). {args.new_tokens} new tokens, brief caption."),
        "",
        "| | vision | first token | decode step (floor) | request | vs model card | second question, first token "
        "| HTTP overhead | " + " | ".join(f"{c} client{'s' * (c != '1')}, req/s (x card)" for c in args.clients.split(","))
        + " | RSS after loading | peak RSS |",
        "| --- " * (8 + len(args.clients.split(",")) + 2) + "|",
    ]
    reference_tokens = next((row["greedy_tokens"] for row in rows if row["config"] == "fp32"), None)
    for row in rows:
        floor = row["text_weight_bytes"] / bandwidth
        second = (f"{row['second_question_first_token_s']:.2f} s ({1 - row['second_question_first_token_s'] / row['fresh_question_first_token_s']:.0%} lower)"
                  if "second_question_first_token_s" in row else "-")
        overhead = f"{row['http_request_s'] / row['engine_request_s'] - 1:+.1%}" if "http_request_s" in row else "-"
        throughput = " | ".join(f"{row['throughput'][c]:.3f} ({row['throughput'][c] / base['throughput'][c]:.1f}x)"
                                for c in args.clients.split(","))
        lines.append(
            f"| {row['config']} | {row['vision_s']:.2f} s ({row['vision_s'] * rate / VISION_GFLOP:.1f}x floor) "
            f"| {row['first_token_s']:.2f} s | {row['decode_step_s'] * 1000:.0f} ms ({row['decode_step_s'] / floor:.2f}x "
            f"of {floor * 1000:.0f} ms) | {row['request_s']:.2f} s | {base['request_s'] / row['request_s']:.2f}x | "
            f"{second} | {overhead} | {throughput} | {row['loaded_rss_gib']:.1f} GiB | {row['peak_rss_gib']:.1f} GiB |"
        )
    for row in rows[1:]:
        lines.append(f"\n{row['config']}: vision {row['weight_formats']['vision']}, text {row['weight_formats']['text']}.")
    if reference_tokens is not None:
        for row in rows[2:]:  # the formats after fp32
            lines.append(f"\n{row['config']}: {agreement(row['greedy_tokens'], reference_tokens):.1%} of greedy tokens "
                         f"equal fp32's before the first difference ({AGREEMENT_PROMPTS} captions).")
    lines += ["", (f"Prefill floor for {prompt_tokens} prompt tokens: "
                   f"{prompt_tokens * TEXT_GFLOP_PER_TOKEN / rate:.2f} s; vision floor {VISION_GFLOP / rate:.2f} s "
                   "(float32 rate; full-size architecture figures).")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
