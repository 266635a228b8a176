"""What masks add to a request: per image (the segmenter's image embedding) and per box (the mask decoder), in one run.

    python benchmarks/masks.py                  # full-size SAM ViT-B and the smallest SAM 2 (Hiera tiny), random weights
    python benchmarks/masks.py --family sam2    # SAM 2 alone (its Segmenter path where torchvision is installed)
    python benchmarks/masks.py --tiny           # a quick check of the script on the tiny random segmenters

Two measures per architecture, both on the CPU in float32 with this process's torch threads:
- the model alone: `get_image_embeddings` on one 1024 x 1024 input (what a new image adds), and one mask-decoder
  call (`model(image_embeddings=..., input_boxes=..., multimask_output=False)`) with 1 and with 8 boxes, whose
  difference / 7 is what each further box adds;
- kosmos-serve's own `Segmenter` on a fresh 640 x 480 image (processor, embedding, decoder, `post_process_masks`
  and COCO RLE): a first request with one box, then the same image again with 1 and 8 boxes (the embedding
  cached). SAM 2's runs where torchvision is installed (its transformers processor needs it: README, "Masks",
  e.g. in the environment of tests/tool_environments.py), else SAM 2 is timed as a model only.
Each figure is the median of --repeats runs after a warm-up; the CPU heads the report.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench import cpu_description  # the benchmark scripts' shared helpers

BOX_COUNTS = (1, 8)
NAMES = {"sam": "SAM ViT-B", "sam2": "SAM 2.1 Hiera tiny"}  # the architecture each family is timed on


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def boxes(count: int, side: int) -> torch.Tensor:
    """`count` boxes spread over a `side` x `side` input, as the processor hands them to the model: (1, count, 4)."""
    generator = torch.Generator().manual_seed(count)
    corners = torch.rand(count, 2, generator=generator) * side * 0.6
    sizes = torch.rand(count, 2, generator=generator) * side * 0.4 + 8
    return torch.cat([corners, corners + sizes], dim=1)[None]


@torch.inference_mode()
def model_alone(model, side: int, repeats: int) -> dict[str, float]:
    """Seconds of one image's embedding, and of one decoder call with each of BOX_COUNTS boxes."""
    pixels = torch.randn(1, 3, side, side)
    figures = {"embedding": median_seconds(lambda: model.get_image_embeddings(pixels), repeats)}
    embeddings = model.get_image_embeddings(pixels)
    arguments = ({"image_embeddings": embeddings[0], "intermediate_embeddings": embeddings[1]}
                 if model.config.model_type == "sam_hq" else {"image_embeddings": embeddings})
    for count in BOX_COUNTS:
        prompts = boxes(count, side)
        figures[f"decoder_{count}"] = median_seconds(
            lambda prompts=prompts: model(**arguments, input_boxes=prompts, multimask_output=False), repeats)
    return figures


def through_the_segmenter(folder: Path, repeats: int) -> dict[str, float]:
    """Seconds of kosmos-serve's Segmenter on a fresh image (one box), then on the same image with 1 and 8 boxes."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine.segmentation import Segmenter
    from kosmos_serve.images import image_digest

    segmenter = Segmenter(EngineSettings(segmenter=str(folder)), torch.device("cpu"), torch.float32)
    images = iter(Image.effect_noise((640, 480), 40 + index).convert("RGB") for index in range(10 * repeats + 10))
    box_list = [tuple(int(v) for v in box) for box in boxes(max(BOX_COUNTS), 480)[0].tolist()]

    def fresh() -> None:
        image = next(images)
        segmenter.segment(image, image_digest(image), box_list[:1])

    figures = {"first_box": median_seconds(fresh, repeats)}
    image = next(images)
    key = image_digest(image)
    for count in BOX_COUNTS:
        figures[f"cached_{count}"] = median_seconds(lambda count=count: segmenter.segment(image, key,
                                                                                          box_list[:count]), repeats)
    return figures


def build(family: str, folder: Path, tiny: bool) -> Path:
    """A segmenter folder: the project's tiny random one, or the full-size SAM ViT-B architecture (SamConfig's
    defaults) or SAM 2.1 Hiera tiny (Sam2Config's, the smallest SAM 2) with random weights; a SAM 2 is saved
    without its processor where torchvision is missing."""
    from transformers import AutoModelForMaskGeneration, Sam2Config, SamConfig, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
    from transformers.utils import is_torchvision_available

    from kosmos_serve.training.tiny_segmenter import build_tiny_segmenter, sam2_config

    if tiny and (family == "sam" or is_torchvision_available()):
        return build_tiny_segmenter(folder, family)
    torch.manual_seed(0)
    config = SamConfig() if family == "sam" else sam2_config("sam2") if tiny else Sam2Config()
    AutoModelForMaskGeneration.from_config(config).save_pretrained(folder)
    if family == "sam":
        SamProcessor(SamImageProcessorPil()).save_pretrained(folder)
    elif is_torchvision_available():
        from transformers import Sam2Processor
        from transformers.models.sam2.image_processing_sam2 import Sam2ImageProcessor

        Sam2Processor(Sam2ImageProcessor()).save_pretrained(folder)
    return folder


def report(name: str, alone: dict[str, float], served: dict[str, float] | None) -> list[str]:
    per_box = (alone["decoder_8"] - alone["decoder_1"]) / 7
    lines = [(f"| {name} | model alone | {alone['embedding'] * 1000:.0f} | {alone['decoder_1'] * 1000:.1f} | "
             f"{per_box * 1000:.1f} |")]
    if served is not None:
        lines.append(f"| {name} | kosmos-serve Segmenter, 640x480 image | {served['first_box'] * 1000:.0f} | "
                     f"{served['cached_1'] * 1000:.1f} | {(served['cached_8'] - served['cached_1']) / 7 * 1000:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(NAMES), action="append",
                        help="the architectures to time (repeatable; default: both)")
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random segmenters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="treat denormal floats as zero (torch.set_flush_denormal): random weights on a real image "
                             "make denormal activations in SAM's encoder, which x86 computes many times slower")
    args = parser.parse_args()
    torch.set_flush_denormal(args.flush_denormal)
    from transformers import AutoModelForMaskGeneration
    from transformers.utils import is_torchvision_available

    from kosmos_serve.engine.loading import quiet_transformers

    quiet_transformers()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, threads {torch.get_num_threads()}; flush denormals "
          f"{args.flush_denormal}")
    print("| architecture | path | per image, ms (embedding; first box included for the Segmenter) | "
          "one box, ms (decoder call; embedding cached) | each further box, ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    for family in args.family or sorted(NAMES):
        with tempfile.TemporaryDirectory() as folder:
            built = build(family, Path(folder) / family, args.tiny)
            model = AutoModelForMaskGeneration.from_pretrained(built).eval()
            side = model.config.prompt_encoder_config.image_size
            alone = model_alone(model, side, args.repeats)
            del model
            served = (through_the_segmenter(built, args.repeats)
                      if family == "sam" or is_torchvision_available() else None)
            name = f"tiny random {family}" if args.tiny else f"{NAMES[family]} (random weights)"
            for line in report(name, alone, served):
                print(line, flush=True)


if __name__ == "__main__":
    main()
