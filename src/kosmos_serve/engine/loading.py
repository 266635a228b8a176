"""Load a Kosmos-2 or Kosmos-2.5 checkpoint (hub id or local folder) on the right device, in the right dtype.

The family is read from the checkpoint's config (`model_type`); the family readies the model for our
batching (`engine/families.py`).
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoConfig, AutoProcessor

from kosmos_serve.config import EngineSettings
from kosmos_serve.engine.families import Family, family_of
from kosmos_serve.engine.kernels import (
    Int4WeightOnlyLinear,
    RowwiseInt8MatmulLinear,
    cpu_features,
    use_rowwise_activations,
)
from kosmos_serve.errors import ModelLoadError

logger = logging.getLogger(__name__)

# What a checkpoint needs; the hub repo also holds pytorch_model.bin and example images.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
DEMO_MODEL_NAME = "demo"  # the small model shipped in the package (kosmos_serve.training.demo_model)
DEMO_MODEL_DIR = Path(__file__).parents[1] / "models" / "demo"
DEMO_SEGMENTER_DIR = Path(__file__).parents[1] / "models" / "demo-segmenter"  # `--segmenter demo`
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(setting: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else is taken as a torch device name."""
    if setting != "auto":
        try:
            device = torch.device(setting)
        except RuntimeError as error:
            raise ModelLoadError(f"Unknown device {setting!r}; use auto, cpu, cuda, cuda:N or mps.") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"Device {setting!r} asked for, but this torch build sees no CUDA GPU; use cpu.")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU, bfloat16 on GPUs that support it, float16 elsewhere."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def model_family(model: str, source: str | None = None) -> Family:
    """The family of `model` (a shipped name, folder or hub id; `source`: its folder, if resolved already), read from
    its config alone: no weights are loaded, and nothing is fetched (a hub id's config must be in the local cache)."""
    if source is None:
        hub_id = model != DEMO_MODEL_NAME and not Path(model).exists() and not model.startswith((".", "/"))
        source = model if hub_id else resolve_source(model)
    try:
        return family_of(AutoConfig.from_pretrained(source, local_files_only=True).model_type, model)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_incomplete(model)) from error


def _incomplete(model: str) -> str:
    return (f"{model!r} holds no complete Kosmos-2 checkpoint (nor Kosmos-2.5: config.json, weights and processor "
            "files as written by save_pretrained).")


def load_model(settings: EngineSettings) -> tuple[torch.nn.Module, object, Family]:
    """Load model and processor from `settings.model`, ready for generation, and the family they belong to."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    formats = weight_formats(settings, device, dtype)
    source = resolve_source(settings.model)
    try:
        family = model_family(settings.model, source)
        processor = AutoProcessor.from_pretrained(source)
        model = family.model_class.from_pretrained(source, dtype=dtype, attn_implementation=settings.attention)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_incomplete(settings.model)) from error
    if not isinstance(processor, family.processor_class):
        raise ModelLoadError(f"{source!r} is not a {family.name} checkpoint (its processor is "
                             f"{type(processor).__name__}).")
    family.prepare(model)
    model.to(device).eval()
    if any(part_format.startswith(("int8", "int4")) for part_format in formats.values()):
        quantize_parts(model, formats, settings.int4_group_size)
        gc.collect()  # the replaced float32 layers sit in reference cycles: free them, and the checkpoint mapping
    model.weight_formats = formats
    logger.info("Loaded %s (%s) on %s as %s (%s attention, quantize=%s: vision %s, text %s)", source, family.name,
                device, dtype, settings.attention, settings.quantize, formats["vision"], formats["text"])
    return model, processor, family


# Weight formats of a part of the model (vision: encoder and resampler; text: the decoder, whose prefill
# and decode share one copy of the weights, so that memory holds the text weights once).
FLOAT32 = "float32"
INT8_FBGEMM = "int8 per row, fbgemm"  # engine.kernels.RowwiseInt8Linear (torch.ao dynamic quantization)
INT8_MATMUL = "int8 per row, torch._int_mm"  # engine.kernels.RowwiseInt8MatmulLinear (oneDNN)
INT4 = "int4 groups, bfloat16 activations"  # engine.kernels.Int4WeightOnlyLinear (ATen's int4 CPU kernel)

# What `--quantize auto` picks on each CPU kind: the kernel measured fastest per part among those that keep
# a row's answer independent of its batch (benchmarks/linear_kernels.py; the tables are in BENCHMARKS.md).
AUTO_FORMATS = {
    # AMD EPYC (Zen 4 class), 2 cores. Vision (257 rows an image): _int_mm 3.9x float32, fbgemm 3.2x,
    # bfloat16 2.5x. Decode (1-32 rows): fbgemm 5.0x at 1 row, _int_mm 2.5x, bfloat16 1.8x. Prefill
    # (75-600 rows): fbgemm and _int_mm 4.5x, 3.2x; oneDNN's qlinear 5.7x, 4.0x, but only in a second
    # copy of the text weights, and decode dominates a request. AMX machines land here too. On the Intel Xeon
    # with AMX, int4 text weights (`--quantize int4`) decode a layer at 1 row 1.4-1.9x faster than fbgemm's int8
    # per row, but their agreement with float32 and the demo model's accuracy are not yet measured, which a
    # format needs before it joins auto (BENCHMARKS.md, "4-bit text weights").
    "avx512_vnni": {"vision": INT8_MATMUL, "text": INT8_FBGEMM},
    # AMD EPYC (AVX2): fbgemm int8 everywhere, 5.0x the model-card code per request (BENCHMARKS.md);
    # bfloat16 is slower than float32 there.
    "avx2": {"vision": INT8_FBGEMM, "text": INT8_FBGEMM},
    "other": {"vision": FLOAT32, "text": FLOAT32},  # fbgemm needs AVX2; no other CPU kind was measured
}


def cpu_kind(flags: frozenset[str], capability: str) -> str:
    """The row of AUTO_FORMATS for a CPU: its /proc/cpuinfo flags, and the kernels torch dispatches to."""
    if capability == "AVX512" and {"avx512_vnni", "avx512bw"} <= flags:
        return "avx512_vnni"
    if capability in ("AVX2", "AVX512") and "avx2" in flags:
        return "avx2"
    return "other"


def weight_formats(settings: EngineSettings, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The format of each part (vision, text) for `settings.quantize` on this device; refuses int8 off the CPU.

    `none` keeps the loaded dtype; `int8` is fbgemm's per-row int8 everywhere; `int4` is int4 text weights
    beside fbgemm's int8 vision; `auto` looks the CPU up in AUTO_FORMATS (off the CPU, or from half-precision
    weights, it keeps the loaded dtype).
    """
    loaded = str(dtype).removeprefix("torch.")
    if settings.quantize in ("int8", "int4"):
        if device.type != "cpu" or dtype != torch.float32:
            raise ModelLoadError(f"--quantize {settings.quantize} runs on the CPU from float32 weights; on a GPU "
                                 "use --dtype bfloat16 or float16 instead.")
        return {"vision": INT8_FBGEMM, "text": INT8_FBGEMM if settings.quantize == "int8" else INT4}
    if settings.quantize == "auto" and device.type == "cpu" and dtype == torch.float32:
        return dict(AUTO_FORMATS[cpu_kind(cpu_features(), torch.backends.cpu.get_cpu_capability())])
    return {"vision": loaded, "text": loaded}


def quantize_parts(model: torch.nn.Module, formats: dict[str, str], int4_group_size: int) -> None:
    """Convert each part's linear layers to its format in `formats`, in place.

    The parameters that stay float32 (embeddings, norms, biases) are first copied out of the
    memory-mapped checkpoint; each linear weight is then read from the mapping as its layer is
    converted. Nothing references the mapping afterwards, so the checkpoint file is released and
    only the quantized model stays in memory. int8 activations are quantized per row (per token), int4
    layers quantize no activations, so a row's result never depends on its batch neighbours.
    """
    for module in model.modules():  # everything but the linear weights leaves the checkpoint's mapping
        for name, parameter in module.named_parameters(recurse=False):
            if not (isinstance(module, torch.nn.Linear) and name == "weight"):
                setattr(module, name, torch.nn.Parameter(parameter.detach().clone(), requires_grad=False))
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.clone())
    parts = {"vision": [model.vision_model, model.image_to_text_projection], "text": [model.text_model]}
    for part, modules in parts.items():
        for root in modules:
            if formats[part] == INT8_FBGEMM:
                # fbgemm's packed int8 weights exist only through torch.ao's quantized tensors: quantize_dynamic
                # works but announces its move to torchao, whose CPU int8 kernels are 4-10x slower (BENCHMARKS.md)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_dynamic(root, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                     inplace=True)
                use_rowwise_activations(root)
            elif formats[part] == INT8_MATMUL:
                replace_linear_layers(root, lambda linear: RowwiseInt8MatmulLinear(linear.weight, linear.bias))
            elif formats[part] == INT4:
                widths = {m.in_features for m in root.modules() if type(m) is torch.nn.Linear}
                if any(width % int4_group_size for width in widths):
                    raise ModelLoadError(f"int4_group_size {int4_group_size} does not divide this model's linear "
                                         f"layers ({', '.join(map(str, sorted(widths)))} inputs); set "
                                         f"KOSMOS_INT4_GROUP_SIZE to a size that does (32, 64 or 128).")
                replace_linear_layers(root, lambda linear: Int4WeightOnlyLinear(linear.weight, linear.bias,
                                                                                int4_group_size))


def replace_linear_layers(root: torch.nn.Module, convert) -> None:
    """Replace every float `torch.nn.Linear` under `root` by `convert(linear)`, in place."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, convert(child))


def resolve_source(model: str, option: str = "--model") -> str:
    """A local folder for `model`: the shipped demo model, the folder itself, the hub cache's copy, or a download.

    `option` is the flag that names it (`--model`, or `--segmenter`, whose `demo` is the shipped demo segmenter).
    """
    if model == DEMO_MODEL_NAME:
        folder, what = (DEMO_MODEL_DIR, "demo model") if option == "--model" else (DEMO_SEGMENTER_DIR, "demo segmenter")
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"The {what} is missing from this install ({folder}); reinstall kosmos-serve.")
        return str(folder)
    if Path(model).is_dir():
        return model
    if Path(model).exists() or model.startswith((".", "/")):
        raise ModelLoadError(f"{option} {model!r} is not a folder; pass a checkpoint folder or a hub id.")
    try:
        return snapshot_download(model, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        return snapshot_download(model, allow_patterns=CHECKPOINT_FILES)
    except RepositoryNotFoundError as error:
        raise ModelLoadError(f"There is no model {model!r} on the Hugging Face hub; check the id.") from error
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        local_dir = "./kosmos-2" if option == "--model" else "./segmenter"
        raise ModelLoadError(
            f"Model {model!r} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
            f"reached from here. Download it once where the hub is reachable (`hf download {model} "
            f"--local-dir {local_dir}`), then pass that folder with {option} (or copy the cache to HF_HOME)."
        ) from error


def set_threads(threads: int | None, workers: int = 1) -> None:
    """torch's intra-op threads: `threads` if given, else the cores shared equally among `workers` processes."""
    torch.set_num_threads(threads or max(1, torch.get_num_threads() // workers))


def quiet_transformers() -> None:
    """Hide transformers' progress bars and advisory warnings (logs and command output stay readable)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
