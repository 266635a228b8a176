"""The reading demo attempt: a small Kosmos-2.5 trained here from scratch to read synthetic pages. Not shipped: in its
budget (at most an hour on 2 cores) it learnt to find the lines but not to read their words (docs/demo-reader.md).

`kosmos-serve train-demo-2.5 --out DIR` builds the model (`build_reader_model`), trains it on pages drawn afresh at
every step (`READER_STYLE`: one to four lines of words from the pages' fixed vocabulary, three fonts, three sizes, on
plain light backgrounds), writes it to DIR/final, and the command scores it on held-out pages (`evaluate --benchmark ocr`: word and
character error rates, line-box F1) into DIR/final/held-out-scores.txt; `--model DIR/final` then serves it like any
Kosmos-2.5.

What it is meant to make learnable on 2 cores (each part in its function below):
- **Small pages, few patches.** 256 x 256 pages cut into at most `READER_MAX_PATCHES` patches of 16 px (the
  checkpoint: 4096), saved as its image processor's `max_patches`, which the engine passes on; one image token per
  patch (the checkpoint: 2048 image tokens).
- **A word is a token.** Byte-level BPE (as the checkpoint's) trained on the vocabulary's words, so each word, with
  or without its leading space, is one token; any other text still tokenizes, byte by byte.
- **A structured start** (`start_structured`): position codes on the patches, the resampler a copy, coordinate
  tokens that point at their patches; and **patch supervision** (`patch_words`): each patch learns the word under it.
Everything else is Kosmos-2.5's architecture at a small width, loaded and served like any checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Kosmos2_5Config,
    Kosmos2_5ForConditionalGeneration,
    Kosmos2_5Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.kosmos2_5.image_processing_pil_kosmos2_5 import Kosmos2_5ImageProcessorPil

from kosmos_serve.generation import MODEL_DEFAULTS_FILE, ModelDefaults
from kosmos_serve.ocr import OCR_TAG, resized_size
from kosmos_serve.training.pages import VOCABULARY, Page, PageStyle, draw_page, load_font, write_pages_dataset
from kosmos_serve.training.tiny_kosmos25 import COORDINATES, SPECIAL_TOKENS, with_family_tokens

READER_STYLE = PageStyle(font_sizes=(20, 24, 28), width_ems=(4, 12), max_width=256, margin_range=(8, 16),
                         lines_range=(1, 4), line_spacing=(1.2, 1.5), two_columns_share=0.0, canvas=(256, 256))
GRID = 16  # a 256 x 256 page is 16 x 16 patches of 16 px
READER_MAX_PATCHES = GRID * GRID
READER_IMAGE_TOKENS = GRID * GRID  # image token i starts as a copy of patch i
CODE_BITS = 4  # a row's (or column's) position code: the 4 bits of its index, as +-1
WIDTH = 128  # of the vision encoder and of the text decoder
LAYERS = 3  # each


@dataclass(frozen=True)
class ReaderRecipe:
    """How the demo reader is trained: AdamW, linear warm-up then cosine decay, pages drawn afresh every step."""

    steps: int = 2700
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0


RECIPE = ReaderRecipe()
HELD_OUT_PAGES, HELD_OUT_SEED = 100, 2  # training pages are drawn from seed 1
TRAIN_SEED = 1
SCORES_FILE = "held-out-scores.txt"
READER_DEFAULTS = ModelDefaults(max_new_tokens=128)  # four lines of a few words with their boxes: ~60 tokens


def build_reader_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the vocabulary's words (each one token), then Kosmos-2.5's tags and coordinates.

    >>> tokenizer = build_reader_tokenizer()
    >>> tokenizer.tokenize("river 25 open\\nthe invoice")
    ['river', 'Ġ25', 'Ġopen', 'Ċ', 'the', 'Ġinvoice']
    >>> tokenizer.tokenize("<bbox><x_5><y_9><x_20><y_30></bbox>Zebra")
    ['<bbox>', '<x_5>', '<y_9>', '<x_20>', '<y_30>', '</bbox>', 'Z', 'e', 'br', 'a']
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(VOCABULARY)] + list(VOCABULARY), trainer)
    return with_family_tokens(backend)


def reader_config(vocab_size: int) -> Kosmos2_5Config:
    """Kosmos-2.5's architecture, 128 wide, 3 vision and 3 text layers, `READER_IMAGE_TOKENS` image tokens."""
    return Kosmos2_5Config(
        text_config={"vocab_size": vocab_size, "embed_dim": WIDTH, "layers": LAYERS, "ffn_dim": 4 * WIDTH,
                     "attention_heads": 4, "max_position_embeddings": 512, "dropout": 0.0, "attention_dropout": 0.0},
        vision_config={"hidden_size": WIDTH, "patch_embed_hidden_size": 16 * 16 * 3, "intermediate_size": 4 * WIDTH,
                       "head_dim": 32, "num_hidden_layers": LAYERS, "num_attention_heads": WIDTH // 32,
                       "max_num_patches": READER_MAX_PATCHES},
        latent_query_num=READER_IMAGE_TOKENS,
    )


def build_reader_model(seed: int = 0) -> tuple[Kosmos2_5ForConditionalGeneration, Kosmos2_5Processor]:
    """The untrained reader and its processor: random weights, coordinate embeddings smooth in their value."""
    tokenizer = build_reader_tokenizer()
    processor = Kosmos2_5Processor(Kosmos2_5ImageProcessorPil(max_patches=READER_MAX_PATCHES), tokenizer,
                                   num_image_tokens=READER_IMAGE_TOKENS)
    torch.manual_seed(seed)
    model = Kosmos2_5ForConditionalGeneration(reader_config(len(tokenizer)))
    with torch.no_grad():
        start_structured(model, tokenizer)
    return model, processor


def position_code(index: int) -> torch.Tensor:
    """A row's or column's index (0-15) as its 4 bits, each +1 or -1.

    >>> position_code(5).tolist()
    [1.0, -1.0, 1.0, -1.0]
    """
    return torch.tensor([1.0 if index >> bit & 1 else -1.0 for bit in range(CODE_BITS)])


def start_structured(model: Kosmos2_5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast) -> None:
    """Start the reader where reading is easy to learn (every weight still trained):
    - each patch carries its row's code in dims 0-3 and its column's in dims 4-7 (the vision embeddings' row and
      column tables write them, the patch's pixels write nothing there);
    - the resampler starts as a copy: image token i attends to patch i (row-major on the 16 x 16 grid) with every head,
      its values and output the identity; dim 8 marks the latent queries, whose own keys it turns away;
    - `<x_N>` carries the code of the column N falls in (dims 4-7), `<y_N>` of its row (dims 0-3), on top of a code
      smooth in N: copying a patch's code towards the output layer (which shares the embeddings) points at its boxes.
    """
    positions, marker = 2 * CODE_BITS, 2 * CODE_BITS  # dims 0-7: the code; dim 8: "a latent query"
    embeddings = model.vision_model.embeddings
    embeddings.patch_projection.weight[:positions + 1] = 0
    embeddings.patch_projection.bias[:positions + 1] = 0
    for table, dims in ((embeddings.row_embedder, slice(0, CODE_BITS)),
                        (embeddings.column_embedder, slice(CODE_BITS, positions))):
        table.weight[:, :positions + 1] = 0
        for index in range(GRID):  # the processor's row and column ids start at 1
            table.weight[index + 1, dims] = 4 * position_code(index)
    projection = model.image_to_text_projection
    projection.dense.weight.copy_(torch.eye(WIDTH))
    projection.dense.weight[marker] = 0
    projection.dense.bias.zero_()
    for query in range(READER_IMAGE_TOKENS):
        row, column = divmod(query, GRID)
        projection.latent_query[query] = 0
        projection.latent_query[query, :positions] = torch.cat([position_code(row), position_code(column)])
        projection.latent_query[query, marker] = 1
    attention = projection.x_attn
    head_dim = WIDTH // attention.num_heads
    for linear, marker_weight in ((attention.q_proj, 10.0), (attention.k_proj, -10.0)):
        linear.weight.zero_()
        linear.bias.zero_()
        for head in range(attention.num_heads):
            for dim in range(positions):
                linear.weight[head * head_dim + dim, dim] = 3.0
            linear.weight[head * head_dim + marker, marker] = marker_weight
    for linear in (attention.v_proj, attention.out_proj):
        linear.weight.copy_(torch.eye(WIDTH))
        linear.bias.zero_()
    table = model.get_input_embeddings().weight
    scale = table.std().item()
    for axis, dims in (("y", slice(0, CODE_BITS)), ("x", slice(CODE_BITS, positions))):
        first = tokenizer.convert_tokens_to_ids(f"<{axis}_0>")
        table[first:first + COORDINATES] = smooth_codes(COORDINATES, WIDTH, scale)
        for value in range(COORDINATES):
            table[first + value, :positions + 1] = 0
            table[first + value, dims] = 4 * scale * position_code(min(value // 16, GRID - 1))


def smooth_codes(count: int, width: int, std: float) -> torch.Tensor:
    """`count` vectors of `width` that change smoothly with their index: cosines of wavelengths from 8 to 4096
    indices, random phases (the global seed's), scaled to `std` per entry."""
    wavelengths = torch.logspace(math.log10(8), math.log10(4096), width)
    phases = torch.rand(width) * 2 * math.pi
    positions = torch.arange(count, dtype=torch.float32)[:, None]
    return torch.cos(2 * math.pi * positions / wavelengths + phases) * std * math.sqrt(2)


def reading_target(page: Page, max_patches: int = READER_MAX_PATCHES) -> str:
    """What the model should write for `page` after `<ocr>`: each line's box, in pixels of the page as the processor
    resizes it, then its text and a line break (the checkpoint's format, which `ocr.read_lines` reads back).

    >>> from PIL import Image
    >>> from kosmos_serve.training.pages import PageLine
    >>> page = Page(Image.new("RGB", (320, 160)), (PageLine("open door", (10, 20, 90, 41)),), "DejaVuSans", 20, 1)
    >>> reading_target(page)  # the page is resized to 352 x 176 px (22 x 11 patches)
    '<bbox><x_11><y_22><x_99><y_45></bbox>open door\\n'
    >>> from kosmos_serve.ocr import read_lines
    >>> read_lines(reading_target(page), 320, 160, READER_MAX_PATCHES)
    (TextLine(text='open door', box=(10, 20, 90, 40), score=0.0),)
    """
    width, height = page.image.size
    resized_width, resized_height = resized_size(width, height, max_patches)
    lines = []
    for line in page.lines:
        x1, y1, x2, y2 = line.box
        box = (round(x1 * resized_width / width), round(y1 * resized_height / height),
               round(x2 * resized_width / width), round(y2 * resized_height / height))
        lines.append(f"<bbox><x_{box[0]}><y_{box[1]}><x_{box[2]}><y_{box[3]}></bbox>{line.text}\n")
    return "".join(lines)


def training_batches(processor: Kosmos2_5Processor, recipe: ReaderRecipe, first_step: int) -> Iterator[dict]:
    """The batches from `first_step` on: fresh pages (step k's from its own seed), the processor's inputs, and labels
    (-100 but on the reading and its end)."""
    prompt_length = len(processor(text=OCR_TAG, images=[draw_page(random.Random(0), READER_STYLE).image],
                                  max_patches=READER_MAX_PATCHES)["input_ids"][0])
    for step in range(first_step, recipe.steps):
        rng = random.Random(f"reader:{TRAIN_SEED}:{step}")
        pages = [draw_page(rng, READER_STYLE) for _ in range(recipe.batch_size)]
        texts = [OCR_TAG + reading_target(page) + processor.tokenizer.eos_token for page in pages]
        inputs = processor(images=[page.image for page in pages], text=texts, max_patches=READER_MAX_PATCHES)
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        labels[:, :prompt_length] = -100
        yield {**inputs, "labels": labels, "patch_words": torch.stack([patch_words(page) for page in pages])}


WORD_INDEX = {word: index + 1 for index, word in enumerate(VOCABULARY)}  # 0: no word


def patch_words(page: Page) -> torch.Tensor:
    """For each of the page's 16 x 16 patches (row-major), the word its centre lies on (`WORD_INDEX`), else 0.

    A word's extent is its line's ink box cut where the font's advance puts the spaces.

    >>> from PIL import Image
    >>> from kosmos_serve.training.pages import PageLine
    >>> page = Page(Image.new("RGB", (256, 256)), (PageLine("open door", (10, 20, 100, 40)),), "DejaVuSans", 20, 1)
    >>> words = patch_words(page).view(16, 16)
    >>> words[1, :8].tolist() == [0] + [WORD_INDEX["open"]] * 3 + [WORD_INDEX["door"]] * 3 + [0]
    True
    """
    font = load_font(page.font, page.font_size)
    words = torch.zeros(GRID, GRID, dtype=torch.long)
    centres = torch.arange(GRID) * 16 + 8
    for line in page.lines:
        x1, y1, _, y2 = line.box
        rows = (centres >= y1) & (centres < y2)
        text = line.text.split(" ")
        for index, word in enumerate(text):
            start = x1 + font.getlength(" ".join(text[:index]) + (" " if index else ""))
            end = x1 + font.getlength(" ".join(text[:index + 1]))
            columns = (centres >= start) & (centres < end)
            words[rows[:, None] & columns[None, :]] = WORD_INDEX[word]
    return words.view(-1)


def train_reader(out_dir: Path, recipe: ReaderRecipe = RECIPE, log: Callable[[str], None] = print) -> Path:
    """Train the reader from scratch; returns its folder (`out_dir`/final). A checkpoint every 250 steps
    (`out_dir`/checkpoint) lets an interrupted run continue where it stopped. (`train-demo-2.5` then scores it on
    `held_out_pages`.)"""
    model, processor = build_reader_model(recipe.seed)
    word_head = torch.nn.Linear(WIDTH, len(VOCABULARY) + 1)  # patch supervision, not saved with the model
    optimizer = torch.optim.AdamW([*model.parameters(), *word_head.parameters()], lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, recipe))
    checkpoint, first_step = out_dir / "checkpoint" / "state.pt", 0
    if checkpoint.exists():
        state = torch.load(checkpoint)
        model.load_state_dict(state["model"])
        word_head.load_state_dict(state["word_head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_step = state["step"]
        log(f"continuing from step {first_step}")
    model.train()
    coordinates = coordinate_ids(processor.tokenizer)
    started, losses = time.monotonic(), []
    for step, batch in enumerate(training_batches(processor, recipe, first_step), start=first_step):
        labels, words = batch.pop("labels")[:, 1:], batch.pop("patch_words")
        output = model(**batch)
        token_losses = torch.nn.functional.cross_entropy(output.logits[:, :-1].transpose(1, 2), labels,
                                                         reduction="none")
        read, on_coordinates = labels != -100, torch.isin(labels, coordinates)
        word_loss = torch.nn.functional.cross_entropy(
            word_head(output.vision_model_output.last_hidden_state).transpose(1, 2), words)
        loss = token_losses[read].mean() + word_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append((loss.item(), token_losses[on_coordinates].mean().item(),
                       token_losses[read & ~on_coordinates].mean().item(), word_loss.item()))
        if (step + 1) % 50 == 0:
            mean = [sum(values) / len(values) for values in zip(*losses)]
            log(f"step {step + 1}/{recipe.steps}: loss {mean[0]:.3f} (coordinates {mean[1]:.3f}, the rest "
                f"{mean[2]:.3f}, patches' words {mean[3]:.3f}), "
                f"{(time.monotonic() - started) / (step + 1 - first_step):.2f} s/step")
            losses = []
        if (step + 1) % 250 == 0 or step + 1 == recipe.steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "word_head": word_head.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1}, checkpoint)
    final = out_dir / "final"
    model.eval()
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / MODEL_DEFAULTS_FILE).write_text(READER_DEFAULTS.model_dump_json(indent=2, exclude_none=True) + "\n")
    return final


def coordinate_ids(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The ids of every `<x_N>` and `<y_N>` token."""
    return torch.tensor(tokenizer.convert_tokens_to_ids([f"<{axis}_{value}>" for axis in "xy"
                                                         for value in range(COORDINATES)]))


def learning_rate_factor(step: int, recipe: ReaderRecipe) -> float:
    """Linear warm-up over `warmup_steps`, then a cosine down to 0 at the last step."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)))


def held_out_pages(out_dir: Path) -> Path:
    """The held-out pages (seed `HELD_OUT_SEED`, never drawn in training) under `out_dir`/held-out; their pages.jsonl."""
    pages = out_dir / "held-out" / "pages.jsonl"
    return pages if pages.exists() else write_pages_dataset(pages.parent, HELD_OUT_PAGES, HELD_OUT_SEED, READER_STYLE)

