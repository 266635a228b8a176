"""One token choice for the whole batch: each row's token is the one `generate`'s processors pick for it alone."""

import random

import pytest
import torch
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from kosmos_serve.engine.choice import NgramBans, RowChooser, choose_tokens
from kosmos_serve.engine.scoring import GroundingVocabulary

VOCAB = 50


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_ngram_bans_kept_as_the_row_grows_ban_what_transformers_processor_bans(size):
    rng = random.Random(size)
    processor = NoRepeatNGramLogitsProcessor(size)
    bans = NgramBans(size)
    ids = [rng.randrange(6) for _ in range(3)]  # a small alphabet: n-grams repeat often
    for _ in range(60):
        expected = processor(torch.tensor([ids]), torch.zeros(1, VOCAB))[0].isinf().nonzero().view(-1).tolist()
        assert sorted(set(bans(ids))) == expected
        ids.append(rng.randrange(6))


def mixed_choosers():
    """Greedy rows (plain, with an n-gram ban, with a processor that is not a ban) and seeded sampled rows."""
    def sampled(seed, top_p):
        generator = torch.Generator().manual_seed(seed)
        processors = [NoRepeatNGramLogitsProcessor(3), TemperatureLogitsWarper(1.3), TopPLogitsWarper(top_p)]
        return RowChooser(LogitsProcessorList(processors), generator)

    return [
        RowChooser(LogitsProcessorList()),
        RowChooser(LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)])),
        sampled(11, 0.9),
        RowChooser(LogitsProcessorList([NoRepeatNGramLogitsProcessor(2)])),
        RowChooser(LogitsProcessorList([NoRepeatNGramLogitsProcessor(3), TemperatureLogitsWarper(0.5)])),
        sampled(5, 0.5),
    ]


def test_the_batched_choice_of_mixed_rows_equals_each_row_chosen_alone_and_leaves_the_logits_as_they_were():
    rng = random.Random(0)
    batched, alone = mixed_choosers(), mixed_choosers()
    assert [chooser.batched for chooser in batched] == [True, True, False, True, False, False]
    rows = [[rng.randrange(8) for _ in range(5 + row)] for row in range(len(batched))]
    alone_rows = [list(ids) for ids in rows]
    for _ in range(40):
        logits = torch.randn(len(rows), VOCAB)
        logits[:, :8] += 3  # the row's own tokens lead, so that bans matter
        before = logits.clone()
        tokens = choose_tokens(logits, batched, rows)
        assert torch.equal(logits, before)
        for row, (chooser, ids) in enumerate(zip(alone, alone_rows)):
            # the reference: transformers' processors on the row alone, then argmax, or sampling with its generator
            assert tokens[row] == chooser.choose_alone(ids, before[row].clone())
        for ids, alone_ids, token in zip(rows, alone_rows, tokens):
            ids.append(token)
            alone_ids.append(token)
    banned_row = rows[1]  # greedy with a 3-gram ban: no 3-gram twice, though its own tokens lead every step
    trigrams = list(zip(banned_row[5:], banned_row[6:], banned_row[7:]))
    assert len(trigrams) == len(set(trigrams))


def test_every_position_scoring_reads_is_one_the_scheduler_notes(engine):
    vocabulary: GroundingVocabulary = engine.vocabulary
    tokenizer = engine.processor.tokenizer
    caption = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
               "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
               "</delimiter_of_multi_objects/><patch_index_0012><patch_index_0915></object> and a<object><patch_index_0100><patch_index_0200></object>")
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    prompt = 4  # `<grounding> An image of`: the rest is written by the model
    assert not vocabulary.ends_in_phrase(ids[:prompt]) and vocabulary.ends_in_phrase(ids[: ids.index(vocabulary.phrase_start) + 2])
    noted, phrase_open = set(), vocabulary.ends_in_phrase(ids[:prompt])
    for pos in range(prompt, len(ids)):
        if vocabulary.read_by_scoring(phrase_open, ids[pos]):
            noted.add(pos)
        phrase_open = vocabulary.phrase_open_after(phrase_open, ids[pos])
    read = vocabulary.entity_tokens(ids)
    assert len(read) == 3  # the snowman, the fire (two boxes) and a bare box
    for phrase, corners in read:
        assert set(phrase) | {pos for pair in corners for pos in pair} <= noted
    unread = tokenizer.decode([ids[pos] for pos in range(prompt, len(ids)) if pos not in noted])
    assert "warming himself by" in unread and "snowman" not in unread  # words outside phrases: not read
