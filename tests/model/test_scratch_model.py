"""The from-scratch start: structured so that where things are reaches the text at step one."""

import torch
from PIL import Image

from kosmos_serve.training.scratch import build_scratch_model, grid_codes


def test_resampler_query_i_starts_looking_at_patch_i():
    model, processor = build_scratch_model(seed=0)
    image = Image.effect_mandelbrot((224, 224), (-2, -1.5, 1, 1.5), 40).convert("RGB")
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.vision_model(pixels)[0]
        features = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
        resampler = model.image_to_text_projection
        keys = resampler.x_attn.k_proj(resampler.dense(features[0]))
        queries = resampler.x_attn.q_proj(resampler.latent_query)
    head = resampler.x_attn.head_dim
    weights = torch.softmax(queries[:, :head] @ keys[:, :head].T * head**-0.5, dim=-1)
    own_patch = weights[torch.arange(64), torch.arange(64) + 1]  # key 0 is the class token
    assert (weights.argmax(dim=-1) == torch.arange(64) + 1).all()
    assert own_patch.mean() > 0.9


def test_image_tokens_depend_on_the_image_and_location_tokens_on_their_cell():
    model, processor = build_scratch_model(seed=0)
    images = [Image.new("RGB", (224, 224), colour) for colour in ("red", "blue")]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.vision_model(pixels)[0]
        features = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(hidden), dim=-1)
        embeds, _ = model.image_to_text_projection(features)
    assert (embeds[0] - embeds[1]).abs().mean() > 0.1 * embeds.abs().mean()
    table = model.get_input_embeddings().weight
    first = processor.tokenizer.convert_tokens_to_ids("<patch_index_0000>")
    cells = torch.nn.functional.normalize(table[first : first + 1024], dim=-1)
    assert cells[0] @ cells[1] > cells[0] @ cells[1023]  # neighbours start closer than far cells


def test_grid_codes_are_sharp_or_smooth_as_asked():
    sharp = torch.nn.functional.normalize(grid_codes(8, 24, sharp=True), dim=-1)
    similarity = sharp @ sharp.T
    assert (similarity.argmax(dim=-1) == torch.arange(64)).all()
    smooth = grid_codes(32, 64)
    assert torch.dist(smooth[0], smooth[1]) < torch.dist(smooth[0], smooth[31])


def test_lookups_start_on_the_object_the_words_name():
    from kosmos_serve.training.patch_supervision import WORD_CODE_SCALE
    from kosmos_serve.training.scratch import LOOKUP_LAYER, word_space

    model, processor = build_scratch_model(seed=0)
    model.set_attn_implementation("eager")
    inputs = processor(text="<grounding><phrase> the red circle</phrase><object>", images=Image.new("RGB", (224, 224)),
                       return_tensors="pt")
    table = model.get_input_embeddings().weight.detach()
    word = {name: table[processor.tokenizer.convert_tokens_to_ids(f"▁{name}")] for name in ("red", "circle", "blue", "square")}
    width = table.shape[1]
    _, turn = word_space(width, width // model.config.text_config.attention_heads)
    # Image tokens 0-31 hold a blue square's words (as patch supervision teaches), 32-63 a red circle's.
    image_embeds = torch.zeros(1, 64, width)
    image_embeds[0, :32] = WORD_CODE_SCALE * (word["blue"] + word["square"]) @ turn.T
    image_embeds[0, 32:] = WORD_CODE_SCALE * (word["red"] + word["circle"]) @ turn.T
    with torch.no_grad():
        out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               image_embeds=image_embeds, image_embeds_position_mask=inputs["image_embeds_position_mask"],
                               output_attentions=True)
    writer = inputs["input_ids"].shape[1] - 1  # <object>: the position that writes the box
    gather = out.attentions[0][0, 0, writer]
    assert gather[writer - 3 : writer - 1].sum() > 0.8  # "red" and "circle"
    image_start = int(inputs["image_embeds_position_mask"][0].nonzero()[0])
    lookup = out.attentions[LOOKUP_LAYER][0, 0, writer, image_start : image_start + 64]
    assert lookup[32:].sum() > 0.9
    red = writer - 3  # (the image placeholders' ids are ordinary words here too)
    name_lookup = out.attentions[0][0, 1, red, image_start : image_start + 64]  # "red" finds the red circle
    assert name_lookup[32:].sum() > 0.9
