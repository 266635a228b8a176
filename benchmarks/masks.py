"""What masks add to a request: per image (the segmenter's image embedding) and per box (the mask decoder), in one run.

    python benchmarks/masks.py            # full-size SAM ViT-B and the smallest SAM 2 (Hiera tiny), random weights
    python benchmarks/masks.py --tiny     # a quick check of the script on the tiny random SAM

Two measures per architecture, both on the CPU in float32 with this process's torch threads:
- the model alone: `get_image_embeddings` on one 1024 x 1024 input (what a new image adds), and one mask-decoder
  call (`model(image_embeddings=..., input_boxes=..., multimask_output=False)`) with 1 and with 8 boxes, whose
  difference / 7 is what each further box adds;
- SAM through kosmos-serve's own `Segmenter` on a fresh 640 x 480 image (processor, embedding, decoder,
  `post_process_masks` and COCO RLE): a first request with one box, then the same image again with 1 and 8 boxes
  (the embedding cached). SAM 2 runs the model-alone measure only: transformers' Sam2Processor needs torchvision,
  which is not installed here (README, "Masks").
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


def build_sam(folder: Path, tiny: bool) -> Path:
    """The full-size SAM ViT-B architecture (SamConfig's defaults) with random weights and SAM's processor."""
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    if tiny:
        from kosmos_serve.training.tiny_segmenter import build_tiny_segmenter

        return build_tiny_segmenter(folder, "sam")
    torch.manual_seed(0)
    SamModel(SamConfig()).save_pretrained(folder)
    SamProcessor(SamImageProcessorPil()).save_pretrained(folder)
    return folder


def report(name: str, side: int, alone: dict[str, float], served: dict[str, float] | None) -> list[str]:
    per_box = (alone["decoder_8"] - alone["decoder_1"]) / 7
    lines = [(f"| {name} | model alone | {alone['embedding'] * 1000:.0f} | {alone['decoder_1'] * 1000:.1f} | "
             f"{per_box * 1000:.1f} |")]
    if served is not None:
        lines.append(f"| {name} | kosmos-serve Segmenter, 640x480 image | {served['first_box'] * 1000:.0f} | "
                     f"{served['cached_1'] * 1000:.1f} | {(served['cached_8'] - served['cached_1']) / 7 * 1000:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random SAM")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flush-denormal", action="store_true",
                        help="treat denormal floats as zero (torch.set_flush_denormal): random weights on a real image "
                             "make denormal activations in SAM's encoder, which x86 computes many times slower")
    args = parser.parse_args()
    torch.set_flush_denormal(args.flush_denormal)
    from transformers import Sam2Config, Sam2Model, SamModel

    from kosmos_serve.engine.loading import quiet_transformers

    quiet_transformers()
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; flush denormals {args.flush_denormal}")
    print("| architecture | path | per image, ms (embedding; first box included for the Segmenter) | "
          "one box, ms (decoder call; embedding cached) | each further box, ms |")
    print("| --- | --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        sam_folder = build_sam(Path(folder) / "sam", args.tiny)
        sam = SamModel.from_pretrained(sam_folder).eval()
        side = sam.config.vision_config.image_size
        name = "tiny SAM" if args.tiny else "SAM ViT-B (random weights)"
        lines = report(name, side, model_alone(sam, side, args.repeats), through_the_segmenter(sam_folder, args.repeats))
        del sam
        for line in lines:
            print(line, flush=True)
    if not args.tiny:
        torch.manual_seed(0)
        sam2 = Sam2Model(Sam2Config()).eval()  # Sam2Config's defaults: SAM 2.1 Hiera tiny, the smallest SAM 2
        for line in report("SAM 2.1 Hiera tiny (random weights)", 1024, model_alone(sam2, 1024, args.repeats), None):
            print(line, flush=True)


if __name__ == "__main__":
    main()
