"""The model families the engine serves, Kosmos-2 and Kosmos-2.5: what differs between them, in one place.

A family names the classes that load its checkpoints, the tasks it runs and its built-in defaults, and
says how a prompt becomes token ids, how images become the features its text decoder reads, and how a
generation is parsed. Everything else (the scheduler, prefill and decode, the feature cache) is shared:
both text decoders read `image_embeds` at the positions `image_embeds_position_mask` marks, with
sinusoidal positions counted from the pad id, and decode the same way.

The two differ in their vision side: Kosmos-2 squashes an image to 224 x 224 pixels (`pixel_values`);
Kosmos-2.5 cuts it into up to 4096 patches of 16 x 16 at its own aspect ratio (`flattened_patches`,
padded to 4096 with zeros, which its encoder masks), and its projection makes a fixed number of image
tokens of them either way.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import (
    Kosmos2_5ForConditionalGeneration,
    Kosmos2_5Processor,
    Kosmos2ForConditionalGeneration,
    Kosmos2Processor,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2TextForCausalLM
from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionAttention, eager_attention_forward

from kosmos_serve.engine.features import flattened_patch_features, image_features
from kosmos_serve.engine.line_scoring import ReadingVocabulary, score_lines
from kosmos_serve.engine.requests import TOKENISATION_PLACEHOLDER, tokenise
from kosmos_serve.engine.scoring import GroundingVocabulary, PhrasePriors, TokenEvidence, score_output
from kosmos_serve.errors import ModelLoadError
from kosmos_serve.generation import ModelDefaults
from kosmos_serve.grounding import GroundedText, parse_generation
from kosmos_serve.ocr import parse_reading
from kosmos_serve.tasks import PromptSpec, Task


class PaddingAwareKosmos2TextForCausalLM(Kosmos2TextForCausalLM):
    """Kosmos-2's text decoder with positions that skip left padding at every step.

    Upstream (transformers 5.23) drops `position_ids` in `prepare_inputs_for_generation` and, while
    decoding, derives positions from the cache length, which counts left pads; prefill positions
    skip them. A padded row therefore sees shifted positions after its first token. Positions
    from the attention mask (`cumsum * mask + padding_idx`, exactly prefill's formula) agree with
    upstream for unpadded rows and are right for padded ones.
    """

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """Upstream's inputs plus position ids that ignore left padding."""
        inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None:
            mask = attention_mask.long()
            positions = mask.cumsum(dim=-1) * mask + self.config.pad_token_id
            inputs["position_ids"] = positions[:, -inputs["input_ids"].shape[1] :]
        return inputs


class Kosmos2Family:
    """Kosmos-2: grounded captions, phrases and questions on a 224-pixel image; boxes as patch-index tokens."""

    model_type = "kosmos-2"
    name = "Kosmos-2"
    model_class = Kosmos2ForConditionalGeneration
    processor_class = Kosmos2Processor
    # the tasks it runs, the first the default
    tasks = (Task.CAPTION, Task.DETAILED_CAPTION, Task.PHRASE_GROUNDING, Task.REFERRING_COMPREHENSION,
             Task.REFERRING_GENERATION, Task.GROUNDED_VQA, Task.REGION_VQA, Task.DETECTION, Task.RAW)
    defaults = ModelDefaults()  # generation's built-in defaults are Kosmos-2's (the original demo's)

    def prepare(self, model: Kosmos2ForConditionalGeneration) -> None:
        """Ready a loaded model for batched generation: its text decoder's positions skip left padding."""
        model.text_model.__class__ = PaddingAwareKosmos2TextForCausalLM

    def vocabulary(self, processor: Kosmos2Processor) -> GroundingVocabulary:
        """The grounding tags and location tokens that scoring reads."""
        return GroundingVocabulary(processor.tokenizer, processor.num_patch_index_tokens)

    def tokenise(self, processor: Kosmos2Processor, spec: PromptSpec) -> tuple[list[int], list[int]]:
        """Token ids and image-position mask of a prompt and its boxes, exactly as the processor makes them."""
        return tokenise(processor, spec.text, list(spec.bboxes) if spec.bboxes else None)

    def encode_images(self, model, processor: Kosmos2Processor, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image features as `generate` computes them, for a batch of images (images, image tokens, width)."""
        pixel_values = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return image_features(model, pixel_values.to(model.device, model.dtype))

    def parse(self, processor: Kosmos2Processor, decoded_text: str, spec: PromptSpec,
              image_size: tuple[int, int]) -> GroundedText:
        """A generation (the whole sequence decoded) as `post_process_generation` reads it, boxes in pixels too."""
        return parse_generation(decoded_text, spec.text, *image_size)

    def score(self, output: GroundedText, ids: list[int], prompt_length: int, evidence: TokenEvidence,
              vocabulary: GroundingVocabulary, priors: PhrasePriors) -> GroundedText:
        """`output` (generated as `ids`) with every box scored (`scoring.py`)."""
        return score_output(output, ids, prompt_length, evidence, vocabulary, priors)


class Kosmos25Family:
    """Kosmos-2.5: reads text-rich images, every line with its box (`<ocr>`) or the page as markdown (`<md>`)."""

    model_type = "kosmos-2.5"
    name = "Kosmos-2.5"
    model_class = Kosmos2_5ForConditionalGeneration
    processor_class = Kosmos2_5Processor
    tasks = (Task.OCR, Task.MARKDOWN)  # the first the default
    # A page is long (the model doc's examples generate up to 1024 tokens), and repeated n-grams are what a page is
    # made of (`<bbox><x_...`): the doc decodes without forbidding them. Its lines are all kept unless a threshold is
    # set (KOSMOS_MIN_SCORE, the model's kosmos_serve.json, a request's): the built-in one was measured on Kosmos-2's
    # boxes, none on lines.
    defaults = ModelDefaults(max_new_tokens=1024, no_repeat_ngram_size=0, min_score=0.0)

    def prepare(self, model: Kosmos2_5ForConditionalGeneration) -> None:
        """Run the vision encoder's attention as the model's `attn_implementation` says (its requests are one prompt
        each, never left-padded in `generate`: nothing else to change).

        transformers' `Kosmos2_5VisionAttention` (5.23) looks its attention function up with `getattr` on the
        attention registry, which is a mapping, so the lookup always falls back to eager attention: softmax over
        every 4,096 x 4,096 score matrix, most of a page's vision time (BENCHMARKS.md, "Kosmos-2.5"). Each vision
        attention module here looks it up as the text model's attention does (`get_interface`); `--attention eager`
        keeps the eager path, transformers' own numbers bit for bit.
        """
        if model.config.vision_config._attn_implementation == "eager":
            return
        for module in model.vision_model.modules():
            if isinstance(module, Kosmos2_5VisionAttention):
                module.forward = types.MethodType(_vision_attention_through_the_interface, module)

    def vocabulary(self, processor: Kosmos2_5Processor) -> ReadingVocabulary:
        """The box tags and coordinate tokens that scoring reads."""
        return ReadingVocabulary(processor.tokenizer)

    def tokenise(self, processor: Kosmos2_5Processor, spec: PromptSpec) -> tuple[list[int], list[int]]:
        """Token ids and image-position mask (-1 on `<image>` and `</image>`, 1 on the image tokens) of a prompt,
        exactly as the processor makes them (its image cut into one patch: the ids do not depend on it)."""
        encoded = processor(text=spec.text, images=TOKENISATION_PLACEHOLDER, max_patches=1)
        return encoded["input_ids"][0].tolist(), encoded["image_embeds_position_mask"][0].tolist()

    def encode_images(self, model, processor: Kosmos2_5Processor, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image features as `generate` computes them, one page at a time (its attention over 4096 patches is the
        largest tensor the engine makes), cut into as many patches as the model's image processor says (the
        processor's call asks 4096 whatever it says; the checkpoints' say 4096 too, the reading attempt's 256)."""
        features = []
        for image in images:
            patches = processor(text="", images=image, max_patches=processor.image_processor.max_patches)[
                "flattened_patches"]
            features.append(flattened_patch_features(model, patches.to(model.device, model.dtype)))
        return torch.cat(features)

    def parse(self, processor: Kosmos2_5Processor, decoded_text: str, spec: PromptSpec,
              image_size: tuple[int, int]) -> GroundedText:
        """A reading (the whole sequence decoded) as the model doc post-processes it, boxes in pixels of the image."""
        return parse_reading(decoded_text, spec.text, *image_size, processor.image_processor.max_patches)

    def score(self, output: GroundedText, ids: list[int], prompt_length: int, evidence: TokenEvidence,
              vocabulary: ReadingVocabulary, priors: PhrasePriors) -> GroundedText:
        """`output` (read as `ids`) with every line scored (`line_scoring.py`); no phrase priors."""
        return score_lines(output, ids, prompt_length, evidence, vocabulary)


def _vision_attention_through_the_interface(self: Kosmos2_5VisionAttention, hidden_states: torch.Tensor,
                                            attention_mask: torch.Tensor | None = None, **kwargs):
    """`Kosmos2_5VisionAttention.forward` with its attention function found by `get_interface`, as intended."""
    hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query, key, value = (projection(hidden_states).view(hidden_shape).transpose(1, 2)
                         for projection in (self.query, self.key, self.value))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.output(output.reshape(*hidden_states.shape[:-1], -1)), weights


class Kosmos25ChatFamily(Kosmos25Family):
    """Kosmos-2.5-chat: Kosmos-2.5 trained further to answer questions about a page (`question`), in markdown."""

    name = "Kosmos-2.5-chat"
    tasks = (Task.OCR, Task.MARKDOWN, Task.QUESTION)  # the first the default


CHAT_CHECKPOINT_NAME = "kosmos-2.5-chat"  # the hub's microsoft/kosmos-2.5-chat, or a folder of that name

Family = Kosmos2Family | Kosmos25Family
FAMILIES: dict[str, Family] = {family.model_type: family for family in (Kosmos2Family(), Kosmos25Family())}


def family_of(model_type: str, model: str) -> Family:
    """The family of a checkpoint whose config says `model_type` (`model`: how the user named it), else an error.

    Kosmos-2.5-chat's files do not tell it from Kosmos-2.5 (the same `model_type`, architecture, processor and
    tokenizer; only the weights differ), so it is known by its name: a `model` whose last part is `kosmos-2.5-chat`.

    >>> [family_of("kosmos-2.5", name).name for name in ("microsoft/kosmos-2.5-chat", "/models/kosmos-2.5-chat/",
    ...                                                  "microsoft/kosmos-2.5")]
    ['Kosmos-2.5-chat', 'Kosmos-2.5-chat', 'Kosmos-2.5']
    """
    if model_type not in FAMILIES:
        raise ModelLoadError(f"--model {model!r} is a {model_type!r} model; kosmos-serve serves "
                             f"{' and '.join(FAMILIES)} models.")
    if model_type == Kosmos25Family.model_type and model.rstrip("/").rsplit("/", 1)[-1] == CHAT_CHECKPOINT_NAME:
        return Kosmos25ChatFamily()
    return FAMILIES[model_type]
