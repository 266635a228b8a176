"""OpenVINO's own Kosmos-2 pipeline beside the model-card code and kosmos-serve `--quantize auto`, in one run.

    python benchmarks/openvino_kosmos2.py              # full-size Kosmos-2 architecture, random weights (bench.py's)
    python benchmarks/openvino_kosmos2.py --tiny       # a quick check of the script on the project's tiny model

The OpenVINO side reproduces the notebook openvinotoolkit/openvino_notebooks
`notebooks/kosmos2-multimodal-large-language-model/kosmos2-multimodal-large-language-model.ipynb`
(read at commit 136f4038760fb6dbb6652396cb3abeb27197a2b7; its rendering with outputs,
openvinotoolkit/openvino `docs/notebooks/kosmos2-multimodal-large-language-model-with-output.rst` at
7822ef5e7f61f51ef450b3c2aabe482ee9d0b50e, carries the same cells):

* conversion with `ov.convert_model` into four IRs: the vision model (`vision_model.xml`), the image-to-text
  projection (`image_to_text_projection_model.xml`), the text decoder's first stage, which takes the token ids, the
  image embeddings and their position mask and returns the hidden states and the key-value cache
  (`kosmos_input_embed.xml`), and its second stage, one token with the past keys and values
  (`kosmos_with_past.xml`). The vision model and the projection are saved with `compress_to_fp16=False`, the two text
  stages with `ov.save_model`'s default (FP16 weights), as the notebook does;
* its optimization: `nncf.quantize(..., model_type=nncf.ModelType.TRANSFORMER)` (INT8 weights and activations)
  for the vision model and the projection, calibrated on 200 images, and
  `nncf.compress_weights(model, nncf.CompressWeightsMode.INT4_ASYM)` for both text stages;
* its pipeline: the wrapper classes `VisionModelWrapper`, `ImageToTextProjectionModelWrapper`,
  `KosmosForCausalLMWrapper` and `Kosmos2ForConditionalGenerationWrapper`, with `post_layernorm`, the
  normalization and the output layer (`lm_head`) run by torch outside OpenVINO, as in the notebook.

Where these versions (openvino 2026.4.1, nncf 3.4.0, torch 2.13.0, transformers 5.23.0) need a change, it is the
smallest one, marked "Change from the notebook" below:

* transformers 5 returns the text decoder's cache as a `DynamicCache` object and the projection's attention weights
  as None, which `torch.jit.trace` (behind `ov.convert_model`) cannot output; thin modules turn the flat key/value
  tensors into a `DynamicCache` and back, so the IRs have the notebook's inputs and outputs
  (`past_key_values.{i}.key`/`.value` in, `logits` (the hidden states) and `present.{i}.key`/`.value` out);
* transformers 5's `GenerationMixin.generate` no longer drives a model that hands back tuples of NumPy key/value
  arrays, so `greedy_generate` runs the loop it ran for the notebook's settings (greedy, one sequence): it calls the
  wrapper's `prepare_inputs_for_generation` and `__call__` exactly as before and appends the arg-max token;
* the calibration set KoalaAI/StockImages-CC0 cannot be downloaded here: 200 fresh synthetic 640x480 images
  stand in for it (with random weights the images' content carries no meaning anyway);
* the notebook keeps the whole torch model in memory for `post_layernorm`, `lm_head` and the config; here only those
  tensors are read from the checkpoint, so resident memory counts what the pipeline uses.

Each configuration runs in its own process, as in bench.py: the model-card code and kosmos-serve `--quantize auto`
(or `int8`, `int4`, with `--configs`) through bench.py's own workers (this environment), the OpenVINO pipeline, float (as converted) and compressed, in
OpenVINO's own environment (`--ov-python`: torch 2.13.0, transformers 5.23.0, openvino 2026.4.1, nncf 3.4.0,
openvino-tokenizers 2026.4.1.0; see BENCHMARKS.md). The conversion is cached under ~/.cache/kosmos-serve/.
Greedy agreement compares the 32 generated token ids with float32 transformers' (the model card's `generate`) on
bench.py's 4 agreement images; bench.py's own count (the text re-tokenized) is shown beside it, but with random
weights the generated ids fall outside the checkpoint's small tokenizer and that text is empty.
The report (a markdown table) prints, and `--out FILE` appends it there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py's helpers: the model, the images, the timers, the agreement

OV_PYTHON = Path.home() / ".cache" / "kosmos-serve" / "bench-envs" / "openvino" / "bin" / "python"
CONVERTED = Path.home() / ".cache" / "kosmos-serve" / "openvino-kosmos2"
IMAGE_END_TAG = "</image>"
KOSMOS_FORMATS = ("auto", "int8", "int4")  # kosmos-serve --quantize settings measured by bench.py's worker
IDS_SUFFIX = "-ids"  # a worker that reports a kosmos-serve format's generated ids
# The notebook's file names (models_base_folder / ...).
VISION = "vision_model.xml"
PROJECTION = "image_to_text_projection_model.xml"
FIRST_STAGE = "kosmos_input_embed.xml"
SECOND_STAGE = "kosmos_with_past.xml"
INT8_VISION = "vision_model_int8.xml"
INT8_PROJECTION = "image_to_text_projection_model_int8.xml"
INT4_FIRST_STAGE = "kosmos_input_embed_int4.xml"
INT4_SECOND_STAGE = "kosmos_with_past_int4.xml"
IR_FILES = {"openvino-float": (VISION, PROJECTION, FIRST_STAGE, SECOND_STAGE),
            "openvino-compressed": (INT8_VISION, INT8_PROJECTION, INT4_FIRST_STAGE, INT4_SECOND_STAGE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bench.py's full-size random one)")
    parser.add_argument("--tiny", action="store_true", help="run on the project's tiny random model (checks the script)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput figure")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per measurement (median)")
    parser.add_argument("--calibration-images", type=int, default=200, help="the notebook's subset_size")
    parser.add_argument("--ov-python", type=Path, default=OV_PYTHON, help="python of OpenVINO's own environment")
    parser.add_argument("--configs", default="model-card,auto,openvino-float,openvino-compressed,"
                        "openvino-compressed+throughput", help="model-card, auto, int8 and int4 (bench.py's "
                        "workers; kosmos-serve's --quantize settings), "
                        "openvino-float, openvino-compressed; '+throughput' compiles with OpenVINO's THROUGHPUT hint")
    parser.add_argument("--out", type=Path, help="append the markdown report to this file")
    parser.add_argument("--rows", type=Path, help="write each configuration's raw measurements (JSON) to this file")
    parser.add_argument("--agreement-only", action="store_true",
                        help="only the generated token ids against float32 transformers' (no timings)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.convert:
        convert_all(args.model, converted_dir(args.model))  # the torch model is freed on return
        compress_all(converted_dir(args.model), args.model, args.calibration_images)
        return
    if args.worker:
        if args.worker == "reference":
            result = reference_tokens(args)
        elif args.worker.endswith(IDS_SUFFIX):
            result = engine_ids(args, args.worker.removesuffix(IDS_SUFFIX))
        else:
            result = measure_openvino(args)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        result["config"] = args.worker
        print(json.dumps(result))
        return

    model_dir = args.model or bench.prepare_model(args.tiny)
    configs = args.configs.split(",")
    if any(config.startswith("openvino") for config in configs):
        print(f"converting (cached in {converted_dir(model_dir)}) ...", file=sys.stderr, flush=True)
        subprocess.run([str(args.ov_python), __file__, "--convert", "--model", str(model_dir),
                        "--calibration-images", str(args.calibration_images)], check=True)
    common = ["--model", str(model_dir), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if args.agreement_only:
        common.append("--agreement-only")
        configs = [config + IDS_SUFFIX if config in KOSMOS_FORMATS else config for config in configs
                   if config != "model-card"]
    else:  # the generated ids of the same engines, which bench.py's worker does not report
        configs += [config + IDS_SUFFIX for config in configs if config in KOSMOS_FORMATS]
    rows = []
    for config in ["reference", *configs]:
        print(f"measuring {config} ...", file=sys.stderr, flush=True)
        if config.endswith(IDS_SUFFIX):
            command = [sys.executable, __file__, "--worker", config, *common]
        elif config == "model-card" or config in KOSMOS_FORMATS:
            command = [sys.executable, str(Path(__file__).with_name("bench.py")), "--worker", config, *common,
                       "--clients", str(args.clients)]
        elif config == "reference":
            command = [sys.executable, __file__, "--worker", config, *common]
        else:
            command = [str(args.ov_python), __file__, "--worker", config, *common, "--clients", str(args.clients)]
        rows.append(json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout))
    ids = {row["config"]: row["generated_ids"] for row in rows if "generated_ids" in row}
    if args.agreement_only:
        for config, generated in ids.items():
            print(f"{config}: {bench.agreement(generated, ids['reference']):.1%} of float32 transformers' generated "
                  f"token ids before the first difference ({bench.AGREEMENT_PROMPTS} captions); first ids {generated[0][:8]}")
        return
    rows = [row for row in rows if not row["config"].endswith(IDS_SUFFIX)]
    for row in rows:
        row["generated_ids"] = ids.get(row["config"] + IDS_SUFFIX, row.get("generated_ids"))
    # After the workers: its 1 GiB matrix would otherwise count in every worker's peak RSS (a child process starts
    # with its parent's high-water mark).
    machine = bench.measure_machine()
    report = render(rows, machine, args, " ".join(sys.argv[1:]))
    if args.rows:
        args.rows.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(report)
    if args.out:
        with args.out.open("a", encoding="utf-8") as file:
            file.write(report + "\n")


def converted_dir(model_dir: Path) -> Path:
    return CONVERTED / Path(model_dir).resolve().name


def raw_text_tokens(processor, generated_ids) -> list[int]:
    """The generated sequence as bench.py's agreement counts it: the raw text after `</image>`, tokenized again."""
    raw_text = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].split(IMAGE_END_TAG)[-1]
    return processor.tokenizer(raw_text, add_special_tokens=False).input_ids


def reference_tokens(args) -> dict:
    """Greedy tokens of transformers' float32 model (the model card's `generate`) on bench.py's agreement images."""
    import torch
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    tokens, ids = [], []
    with torch.inference_mode():
        for image in bench.fresh_images(bench.AGREEMENT_PROMPTS, seed=3):
            inputs = processor(text=bench.CAPTION, images=image, return_tensors="pt")
            generated = model.generate(
                pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"], image_embeds=None,
                image_embeds_position_mask=inputs["image_embeds_position_mask"], use_cache=True,
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            )
            tokens.append(raw_text_tokens(processor, generated))
            ids.append(generated[0, inputs["input_ids"].shape[1]:].tolist())
    return {"greedy_tokens": tokens, "generated_ids": ids}


def engine_ids(args, quantize: str) -> dict:
    """The ids kosmos-serve's engine generates with `--quantize quantize` for the agreement images (bench.py's
    worker reports them re-tokenized from the text, which random weights leave empty: see BENCHMARKS.md)."""
    from kosmos_serve.config import EngineSettings
    from kosmos_serve.engine import Engine, GenerationParams, Request
    from kosmos_serve.tasks import Task, TaskInput

    engine = Engine(EngineSettings(model=str(args.model), device="cpu", quantize=quantize))
    seen = []
    decode = engine.decode
    engine.decode = lambda ids: seen.append(list(ids)) or decode(ids)  # the sequence, prompt and new tokens
    ids = []
    for image in bench.fresh_images(bench.AGREEMENT_PROMPTS, seed=3):
        params = GenerationParams(max_new_tokens=args.new_tokens, no_repeat_ngram_size=0)
        result = engine.run([Request(image, TaskInput(Task.CAPTION), params)])[0]
        ids.append(seen[-1][len(seen[-1]) - result.generated_tokens:])
    return {"generated_ids": ids}


# ---------------------------------------------------------------------------------------------------------------
# Conversion and compression (the notebook's "Convert models to OpenVINO IR" and "Quantization" sections)
# ---------------------------------------------------------------------------------------------------------------


def convert_all(model_dir: Path, out: Path) -> None:
    """The notebook's conversion, then its NNCF optimization; each IR is written once and kept."""
    if all((out / name).exists() for name in IR_FILES["openvino-float"]):
        return
    import openvino as ov
    import torch
    from torch import nn
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration
    from transformers.cache_utils import DynamicCache
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextSinusoidalPositionalEmbedding

    # transformers 5 keeps the notebook's create_position_ids_from_input_ids as a static method here
    create_position_ids_from_input_ids = Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids

    out.mkdir(parents=True, exist_ok=True)
    model = Kosmos2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=bench.CAPTION, images=bench.fresh_images(1, seed=5)[0], return_tensors="pt")

    def cleanup_torchscript_cache():
        torch._C._jit_clear_class_registry()
        torch.jit._recursive.concrete_type_store = torch.jit._recursive.ConcreteTypeStore()
        torch.jit._state._clear_class_state()
        gc.collect()

    def convert(module: nn.Module, xml_path: Path, example_input):
        if not xml_path.exists():
            with torch.no_grad():
                converted_model = ov.convert_model(module, example_input=example_input)
            ov.save_model(converted_model, xml_path, compress_to_fp16=False)
            cleanup_torchscript_cache()

    # Convert the vision model: pixel_values -> (last_hidden_state, pooler_output).
    convert(model.vision_model, out / VISION, inputs["pixel_values"])

    # Convert Image To Text Projection model.
    class Projection(nn.Module):  # Change from the notebook: transformers 5 returns None attention weights.
        def __init__(self, projection):
            super().__init__()
            self.projection = projection

        def forward(self, image_embeds):
            return self.projection(image_embeds)[0]

    def get_image_embeds(pixel_values):
        vision_model_output = model.vision_model(pixel_values)
        image_embeds = model.vision_model.model.post_layernorm(vision_model_output[0])
        return nn.functional.normalize(image_embeds, dim=-1)

    with torch.no_grad():
        image_embeds = get_image_embeds(inputs["pixel_values"])
    convert(Projection(model.image_to_text_projection), out / PROJECTION, image_embeds)

    # Convert Text model, in two stages.
    class TextStage(nn.Module):
        """Change from the notebook: the flat key/value tensors in and out of transformers 5's DynamicCache."""

        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, image_embeds=None, image_embeds_position_mask=None,
                    position_ids=None, past_key_values=None):
            cache = DynamicCache(config=self.transformer.config)
            for layer, (key, value) in enumerate(past_key_values or ()):
                cache.update(key, value, layer)
            outputs = self.transformer(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                                       image_embeds_position_mask=image_embeds_position_mask,
                                       position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = [tensor for layer in outputs.past_key_values.layers for tensor in (layer.keys, layer.values)]
            return (outputs.last_hidden_state, *present)

    text = TextStage(model.text_model.model)
    # Change from the notebook: a new cache layer starts from a torch.tensor([]) of rank 1, which the converted
    # Concat rejects; an empty slice of the first keys (rank 4, length 0) gives the same result and converts.
    from transformers.cache_utils import DynamicLayer

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    DynamicLayer.lazy_initialization = lazy_initialization
    with torch.no_grad():
        image_embeds, _ = model.image_to_text_projection(image_embeds)
        conv_inputs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "image_embeds": image_embeds,
            "image_embeds_position_mask": inputs["image_embeds_position_mask"],
        }
        outs = text(**conv_inputs)
    layers = (len(outs) - 1) // 2
    inputs_ = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for idx in range(layers):
        inputs_.extend([f"past_key_values.{idx}.key", f"past_key_values.{idx}.value"])
        outputs.extend([f"present.{idx}.key", f"present.{idx}.value"])

    def name_outputs(ov_model, names):
        for out_port, out_name in zip(ov_model.outputs, names):
            out_port.get_tensor().set_names({out_name})

    if not (out / FIRST_STAGE).exists():
        with torch.no_grad():
            ov_model = ov.convert_model(text, example_input=conv_inputs)
        name_outputs(ov_model, outputs)
        for port, name in zip(ov_model.inputs, conv_inputs):
            port.get_tensor().set_names({name})
        ov.save_model(ov_model, out / FIRST_STAGE)  # as the notebook: the default, FP16 weights
        del ov_model
        cleanup_torchscript_cache()

    if not (out / SECOND_STAGE).exists():
        position_ids = create_position_ids_from_input_ids(
            inputs["input_ids"], padding_idx=model.text_model.config.pad_token_id, past_key_values_length=0,
        )[:, -1:]
        past = tuple((outs[1 + 2 * idx], outs[2 + 2 * idx]) for idx in range(layers))
        example_input_second_stage = {
            "input_ids": inputs["input_ids"][:, -1:],
            "attention_mask": inputs["input_ids"].new_ones(1, inputs["input_ids"].shape[1] + 1),
            "position_ids": position_ids,
            "past_key_values": past,
        }
        with torch.no_grad():
            ov_model = ov.convert_model(text, example_input=example_input_second_stage)
        for port, name in zip(ov_model.inputs, inputs_):
            port.get_tensor().set_names({name})
        name_outputs(ov_model, outputs)
        ov.save_model(ov_model, out / SECOND_STAGE)
        del ov_model
        cleanup_torchscript_cache()


def compress_all(out: Path, model_dir: Path, subset_size: int) -> None:
    """The notebook's "Quantization": INT8 vision and projection (nncf.quantize), INT4 text (compress_weights)."""
    import nncf
    import openvino as ov
    import torch
    from torch import nn
    from transformers import AutoProcessor

    core = ov.Core()
    processor = AutoProcessor.from_pretrained(model_dir)
    if not ((out / INT8_VISION).exists() and (out / INT8_PROJECTION).exists()):
        # collect_calibration_data: pixel values, and the projection's inputs through the converted vision model.
        parts = TorchParts(model_dir)
        vision_model = core.compile_model(out / VISION, "CPU")
        calibration_dataset = {"vision_model": [], "image_to_text_proj": []}
        for index, img in enumerate(bench.fresh_images(subset_size, seed=42)):
            print(f"calibration image {index + 1}/{subset_size}", file=sys.stderr, flush=True)
            pixel_values = processor(text=bench.CAPTION, images=img, return_tensors="pt")["pixel_values"]
            vision_model_output = torch.from_numpy(vision_model(pixel_values)[0])
            image_embeds = parts.post_layernorm(vision_model_output)
            image_embeds = nn.functional.normalize(image_embeds, dim=-1)
            calibration_dataset["vision_model"].append(pixel_values)
            calibration_dataset["image_to_text_proj"].append(image_embeds.detach().numpy())
        del vision_model
        for source, target, key in ((VISION, INT8_VISION, "vision_model"),
                                    (PROJECTION, INT8_PROJECTION, "image_to_text_proj")):
            if not (out / target).exists():
                quantized_model = nncf.quantize(
                    model=core.read_model(out / source),
                    calibration_dataset=nncf.Dataset(calibration_dataset[key]),
                    subset_size=subset_size,
                    model_type=nncf.ModelType.TRANSFORMER,
                )
                ov.save_model(quantized_model, out / target)
                del quantized_model
                gc.collect()
    for source, target in ((FIRST_STAGE, INT4_FIRST_STAGE), (SECOND_STAGE, INT4_SECOND_STAGE)):
        if not (out / target).exists():
            # The notebook passes the mode positionally; nncf 3.4 takes it by keyword only (same argument, same value).
            try:
                quantized_model = nncf.compress_weights(core.read_model(out / source),
                                                        mode=nncf.CompressWeightsMode.INT4_ASYM)
            except nncf.errors.InvalidGroupSizeError:  # the tiny model only: its 64 channels are no group of 128
                quantized_model = nncf.compress_weights(core.read_model(out / source),
                                                        mode=nncf.CompressWeightsMode.INT4_ASYM,
                                                        advanced_parameters=nncf.AdvancedCompressionParameters(
                                                            group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))
            ov.save_model(quantized_model, out / target)
            del quantized_model
            gc.collect()


class TorchParts:
    """What the notebook's wrappers take from the torch model: post_layernorm, lm_head and the text config.

    Change from the notebook: it keeps the whole `model` in memory; these tensors alone are read here.
    """

    def __init__(self, model_dir: Path):
        import torch
        from safetensors import safe_open
        from transformers import Kosmos2Config

        config = Kosmos2Config.from_pretrained(model_dir)
        self.text_config = config.text_config
        with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as weights:
            self.post_layernorm = torch.nn.LayerNorm(config.vision_config.hidden_size,
                                                     eps=config.vision_config.layer_norm_eps)
            self.post_layernorm.weight.data = weights.get_tensor("vision_model.model.post_layernorm.weight")
            self.post_layernorm.bias.data = weights.get_tensor("vision_model.model.post_layernorm.bias")
            names = set(weights.keys())
            # The output layer is tied to the token embeddings (tie_word_embeddings) unless the checkpoint has its own.
            head = "text_model.lm_head.weight" if "text_model.lm_head.weight" in names else \
                "text_model.model.embed_tokens.weight"
            self.lm_head = torch.nn.Linear(self.text_config.embed_dim, self.text_config.vocab_size, bias=False)
            self.lm_head.weight.data = weights.get_tensor(head)
        self.post_layernorm.eval()
        self.lm_head.eval()


# ---------------------------------------------------------------------------------------------------------------
# The notebook's pipeline ("Compiling models and prepare pipeline")
# ---------------------------------------------------------------------------------------------------------------


class VisionModelWrapper:
    def __init__(self, compiled, parts):
        self.post_layernorm = parts.post_layernorm
        self.vision_model = compiled
        self.request = compiled.create_infer_request()  # one per wrapper, so each client thread has its own

    def __call__(self, pixel_values, **kwargs):
        import torch

        vision_model_output = self.request.infer([pixel_values])[0]
        return [torch.from_numpy(vision_model_output)]


class ImageToTextProjectionModelWrapper:
    def __init__(self, compiled):
        self.request = compiled.create_infer_request()

    def __call__(self, image_embeds):
        output = self.request.infer([image_embeds])
        return output[0], None  # (image_embeds, projection_attentions): the IR has no attention output


class KosmosForCausalLMWrapper:
    def __init__(self, stage_1, stage_2, parts):
        self.model_stage_1 = stage_1.create_infer_request()
        self.input_names = {key.get_any_name(): idx for idx, key in enumerate(stage_2.inputs)}
        self.output_names = {key.get_any_name(): idx for idx, key in enumerate(stage_2.outputs)}
        self.key_value_input_names = [key for key in self.input_names if "key_values" in key]
        self.key_value_output_names = [key for key in self.output_names if "present" in key]
        self.request = stage_2.create_infer_request()
        self.config = parts.text_config
        self.num_pkv = 2
        self.lm_head = parts.lm_head

    def __call__(self, input_ids, attention_mask=None, image_embeds=None, image_embeds_position_mask=None,
                 position_ids=None, past_key_values=None, **kwargs):
        return self.forward(input_ids, attention_mask, image_embeds, image_embeds_position_mask, position_ids,
                            past_key_values)

    def forward(self, input_ids, attention_mask=None, image_embeds=None, image_embeds_position_mask=None,
                position_ids=None, past_key_values=None, **kwargs):
        import torch

        if past_key_values is None:
            outs = self.model_stage_1.infer(
                {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "image_embeds": image_embeds,
                    "image_embeds_position_mask": image_embeds_position_mask,
                }
            )
            lm_logits = self.lm_head(torch.from_numpy(outs[0]))
            pkv = list(outs.values())[1:]
            pkv = tuple(pkv[i: i + 2] for i in range(0, len(pkv), 2))
            return {"logits": lm_logits, "past_key_values": pkv}

        past_key_values = tuple(past_key_value for pkv_per_layer in past_key_values for past_key_value in pkv_per_layer)
        inputs_ = {
            "input_ids": input_ids[:, -1].unsqueeze(-1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        inputs_.update(dict(zip(self.key_value_input_names, past_key_values)))

        # Run inference
        self.request.start_async(inputs_, share_inputs=True)
        self.request.wait()

        logits = torch.from_numpy(self.request.get_tensor("logits").data)
        logits = self.lm_head(logits)
        past_key_values = tuple(self.request.get_tensor(key).data for key in self.key_value_output_names)
        past_key_values = tuple(past_key_values[i: i + self.num_pkv] for i in range(0, len(past_key_values), self.num_pkv))
        return {"logits": logits, "past_key_values": past_key_values}

    def prepare_inputs_for_generation(self, input_ids, image_embeds=None, image_embeds_position_mask=None,
                                      past_key_values=None, attention_mask=None, use_cache=None, **kwargs):
        import torch
        from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextSinusoidalPositionalEmbedding

        create_position_ids_from_input_ids = Kosmos2TextSinusoidalPositionalEmbedding.create_position_ids_from_input_ids

        input_shape = input_ids.shape
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_shape)
        position_ids = None
        if past_key_values is not None:
            position_ids = create_position_ids_from_input_ids(
                input_ids, padding_idx=self.config.pad_token_id, past_key_values_length=0,
            )[:, -1:]
            input_ids = input_ids[:, -1:]
            image_embeds = None
            image_embeds_position_mask = None
        elif image_embeds_position_mask is not None:
            batch_size, seq_len = input_ids.size()
            mask_len = image_embeds_position_mask.size()[-1]
            image_embeds_position_mask = torch.cat(
                (image_embeds_position_mask,
                 torch.zeros(size=(batch_size, seq_len - mask_len), dtype=torch.bool, device=input_ids.device)),
                dim=1,
            )
        return {"input_ids": input_ids, "image_embeds": image_embeds,
                "image_embeds_position_mask": image_embeds_position_mask, "position_ids": position_ids,
                "past_key_values": past_key_values, "attention_mask": attention_mask}

    def generate(self, input_ids, attention_mask=None, image_embeds=None, image_embeds_position_mask=None,
                 max_new_tokens=32, step_times=None, **kwargs):
        return greedy_generate(self, input_ids, attention_mask, image_embeds, image_embeds_position_mask,
                               max_new_tokens, step_times)


def greedy_generate(model, input_ids, attention_mask, image_embeds, image_embeds_position_mask, max_new_tokens,
                    step_times=None):
    """Change from the notebook: the greedy loop `GenerationMixin.generate` ran for it (one sequence, no sampling),
    driving the same `prepare_inputs_for_generation` and `__call__`. Exactly `max_new_tokens` tokens, as bench.py
    asks of the model-card code (min_new_tokens); `step_times` collects each step's seconds."""
    import torch

    past_key_values = None
    for _ in range(max_new_tokens):
        began = time.perf_counter()
        model_inputs = model.prepare_inputs_for_generation(
            input_ids, image_embeds=image_embeds, image_embeds_position_mask=image_embeds_position_mask,
            past_key_values=past_key_values, attention_mask=attention_mask, use_cache=True)
        outputs = model(**model_inputs)
        past_key_values = outputs["past_key_values"]
        next_token = outputs["logits"][:, -1, :].argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=-1)
        if step_times is not None:
            step_times.append(time.perf_counter() - began)
    return input_ids


class Kosmos2ForConditionalGenerationWrapper:
    def __init__(self, compiled, parts):
        vision, projection, stage_1, stage_2 = compiled
        self.parts = parts
        self.vision_model = VisionModelWrapper(vision, parts)
        self.image_to_text_projection = ImageToTextProjectionModelWrapper(projection)
        self.text_model = KosmosForCausalLMWrapper(stage_1, stage_2, parts)

    def image_embeds(self, pixel_values):
        from torch import nn

        vision_model_output = self.vision_model(pixel_values)
        image_embeds = self.parts.post_layernorm(vision_model_output[0])
        image_embeds = nn.functional.normalize(image_embeds, dim=-1)
        image_embeds, _projection_attentions = self.image_to_text_projection(image_embeds.detach().numpy())
        return image_embeds

    def generate(self, pixel_values=None, image_embeds_position_mask=None, input_ids=None, attention_mask=None,
                 image_embeds=None, **kwargs):
        image_embeds = self.image_embeds(pixel_values)
        return self.text_model.generate(input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                                        image_embeds_position_mask=image_embeds_position_mask, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def measure_openvino(args) -> dict:
    """The notebook's pipeline, float or compressed: per request, per decode step, with concurrent clients."""
    import concurrent.futures

    import openvino as ov
    import torch
    from transformers import AutoProcessor

    core = ov.Core()
    folder = converted_dir(args.model)
    parts = TorchParts(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    # As the notebook: core.compile_model(path, device) with the device's defaults (here "CPU"); a configuration
    # ending in "+throughput" compiles with OpenVINO's THROUGHPUT hint instead (several streams, for the clients).
    form, _, hint = args.worker.partition("+")
    config = {"PERFORMANCE_HINT": "THROUGHPUT"} if hint == "throughput" else {}
    compiled = [core.compile_model(folder / name, "CPU", config) for name in IR_FILES[form]]
    pipeline = Kosmos2ForConditionalGenerationWrapper(compiled, parts)
    loaded_rss = bench.resident_gib()
    images = iter(bench.fresh_images(8 * args.repeats + 4 * args.clients + 8, seed=1))

    def request(new_tokens, pipe=pipeline, image=None, step_times=None):
        inputs = processor(text=bench.CAPTION, images=image or next(images), return_tensors="pt")
        generated = pipe.generate(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"], image_embeds=None,
            image_embeds_position_mask=inputs["image_embeds_position_mask"], max_new_tokens=new_tokens,
            step_times=step_times,
        )
        text = processor.batch_decode(generated, skip_special_tokens=True)[0]
        processor.post_process_generation(text)
        return generated

    agreement_images = bench.fresh_images(bench.AGREEMENT_PROMPTS, seed=3)
    if args.agreement_only:
        with torch.inference_mode():
            return {"generated_ids": [request(args.new_tokens, image=image)[0, -args.new_tokens:].tolist()
                                      for image in agreement_images]}
    with torch.inference_mode():
        request(2)  # warm-up
        pixels = processor(text=bench.CAPTION, images=next(images), return_tensors="pt")["pixel_values"]
        vision = bench.median_time(lambda: pipeline.image_embeds(pixels), args.repeats)
        first_token = bench.median_time(lambda: request(1), args.repeats)
        whole = bench.median_time(lambda: request(args.new_tokens), args.repeats)
        steps = []
        for _ in range(args.repeats):
            times = []
            request(args.new_tokens, step_times=times)
            steps.append(statistics.mean(times[1:]))
        generated = [request(args.new_tokens, image=image) for image in agreement_images]
        greedy = [raw_text_tokens(processor, ids) for ids in generated]
        generated_ids = [ids[0, -args.new_tokens:].tolist() for ids in generated]

        # Throughput with concurrent clients: one after another on the one pipeline, and one thread per client,
        # each with its own infer requests on the shared compiled models (OpenVINO's way to overlap requests).
        batch = [next(images) for _ in range(args.clients)]
        began = time.perf_counter()
        for image in batch:
            request(args.new_tokens, image=image)
        sequential = args.clients / (time.perf_counter() - began)
        pipelines = [Kosmos2ForConditionalGenerationWrapper(compiled, parts) for _ in range(args.clients)]
        batch = [next(images) for _ in range(args.clients)]
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            began = time.perf_counter()
            list(pool.map(lambda pair: request(args.new_tokens, pipe=pair[0], image=pair[1]), zip(pipelines, batch)))
            threaded = args.clients / (time.perf_counter() - began)
    properties = compiled[3]
    precision = properties.get_property("INFERENCE_PRECISION_HINT").to_string()  # bf16 where the CPU has it
    return {
        "vision_s": vision, "first_token_s": first_token, "request_s": whole, "decode_step_s": statistics.median(steps),
        "throughput": {str(args.clients): max(sequential, threaded)},
        "throughput_ways": {"sequential": sequential, "threads": threaded},
        "greedy_tokens": greedy, "generated_ids": generated_ids, "loaded_rss_gib": loaded_rss,
        "text_weight_bytes": step_weight_bytes(core.read_model(folder / IR_FILES[form][3]),
                                               precision, parts),
        "inference_precision": precision,
        "streams": properties.get_property("NUM_STREAMS"), "threads": os.cpu_count(),
        "openvino": ov.get_version(),
    }


def step_weight_bytes(ov_model, precision: str, parts) -> int:
    """Bytes one decode step reads: the second stage's weights as the CPU plugin holds them (float IR weights
    in the inference precision, compressed ones as stored), less the token embeddings (only a row is read),
    plus the float32 output layer torch runs."""
    vocab = parts.text_config.vocab_size
    total = 0
    for node in ov_model.get_ops():
        if node.get_type_name() != "Constant":
            continue
        shape = list(node.get_output_shape(0))
        if len(shape) < 2 or vocab in shape:
            continue
        size = node.get_byte_size()
        element = node.get_output_element_type(0)
        if element.is_real() and "f32" in precision and element.bitwidth == 16:
            size *= 2  # FP16 weights decompressed to float32 at compile time
        total += size
    return total + parts.lm_head.weight.numel() * 4


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def render(rows: list[dict], machine: dict, args, command: str) -> str:
    reference, reference_ids = rows[0]["greedy_tokens"], rows[0]["generated_ids"]
    rows = rows[1:]
    by_config = {row["config"]: row for row in rows}
    bandwidth = machine["bandwidth_gb_s"] * 1e9
    clients = str(args.clients)
    lines = [
        f"### `{f'python benchmarks/openvino_kosmos2.py {command}'.strip()}`",
        "",
        (f"Machine: {machine['cpu']}, {machine['threads']} threads; memory bandwidth "
         f"{machine['bandwidth_gb_s']:.1f} GB/s, float32 matrix products {machine['matmul_gflop_s']:.0f} GFLOP/s "
         f"(measured in this run). Brief caption `{bench.CAPTION}`, {args.new_tokens} new tokens, fresh 640x480 "
         "images."),
        "",
        ("| | weights | vision | first token | decode step (floor) | request | "
         f"{clients} clients, req/s | peak RSS | greedy tokens = float32 transformers' |"),
        "| --- " * 9 + "|",
    ]
    for row in rows:
        floor = row["text_weight_bytes"] / bandwidth
        agreement = "(itself)"
        if row.get("generated_ids"):
            agreement = (f"{bench.agreement(row['generated_ids'], reference_ids):.1%} of ids "
                         f"({bench.agreement(row['greedy_tokens'], reference):.1%} as bench.py counts)")
        if row["config"] == "model-card":
            weights, how = "float32 (torch)", "one after another"
        elif row["config"] in KOSMOS_FORMATS:
            formats = row["weight_formats"]
            weights, how = f"vision {formats['vision']}, text {formats['text']}", "HTTP service"
        else:
            compressed = row["config"].startswith("openvino-compressed")
            weights = ("vision INT8 (nncf.quantize), text INT4_ASYM" if compressed else "vision FP32, text FP16 IR")
            weights += (f"; runs in {row['inference_precision']}, {row['streams']} stream(s); "
                        "lm_head float32 in torch")
            ways = row["throughput_ways"]
            how = max(ways, key=ways.get) + f"; sequential {ways['sequential']:.3f}, threads {ways['threads']:.3f}"
        lines.append(
            f"| {row['config']} | {weights} | {row['vision_s']:.2f} s | {row['first_token_s']:.2f} s | "
            f"{row['decode_step_s'] * 1000:.0f} ms ({row['decode_step_s'] / floor:.2f}x of {floor * 1000:.0f} ms) | "
            f"{row['request_s']:.2f} s | {row['throughput'][clients]:.3f} ({how}) | {row['peak_rss_gib']:.1f} GiB | "
            f"{agreement} |")
    best_ov = [row for row in rows if row["config"].startswith("openvino")]
    if "auto" in by_config and best_ov:
        ours = by_config["auto"]
        ov_latency = min(best_ov, key=lambda row: row["request_s"])
        ov_throughput = max(best_ov, key=lambda row: row["throughput"][clients])
        lines += ["", (f"kosmos-serve `--quantize auto` vs OpenVINO's best: per request "
                       f"{ov_latency['request_s'] / ours['request_s']:.2f}x ({ov_latency['config']}), {clients} clients "
                       f"{ours['throughput'][clients] / ov_throughput['throughput'][clients]:.2f}x "
                       f"({ov_throughput['config']}); the target is 1.3x.")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
