"""Streaming: the engine thread hands token ids over, the consumer makes the text, and it is the answer's text."""

import asyncio
import random

import pytest
import torch
from transformers import TextStreamer

from kosmos_serve.engine import GenerationParams, Request
from kosmos_serve.engine.batcher import Batcher, _HandOff
from kosmos_serve.engine.results import Result
from kosmos_serve.engine.streaming import StreamPiece
from kosmos_serve.tasks import Task, TaskInput


def read_all(stream, pieces):
    return [text for text in map(stream.read, pieces) if text]


def test_a_prompts_pieces_join_into_the_decode_of_its_tokens_however_they_are_handed_over(engine):
    tokenizer = engine.processor.tokenizer
    rng = random.Random(0)
    for _ in range(200):
        prompts = [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))] for _ in range(2)]
        expected = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        for ids, text in zip(prompts, expected):  # one token at a time, as the engine hands them over
            stream = engine.text_stream()
            words = read_all(stream, [StreamPiece((token,)) for token in ids])
            assert "".join(words) + stream.read(StreamPiece(prompt_done=True)) == text
            assert all(word[-1] in " \n" for word in words)  # a word settles once the next one begins
        grouped = []  # both prompts, in uneven groups
        for ids in prompts:
            cut = rng.randrange(len(ids) + 1)
            grouped += [StreamPiece(tuple(ids[:cut])), StreamPiece(tuple(ids[cut:]), prompt_done=True)]
        assert "".join(read_all(engine.text_stream(), grouped)) == "".join(expected)
    assert engine.text_stream().read(StreamPiece(text="a whole answer")) == "a whole answer"


def streamed_requests(images):
    return [
        Request(images[0], TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=40, no_repeat_ngram_size=0)),
        Request(images[1], TaskInput(Task.DETECTION, phrases=("a circle", "two green squares")),
                GenerationParams(max_new_tokens=12)),
        Request(images[2], TaskInput(Task.GROUNDED_VQA, prompt="What is it?"), GenerationParams(max_new_tokens=20)),
    ]


def test_streamed_text_is_the_answers_text_and_what_the_old_streamer_sent(engine, sample_images):
    requests = streamed_requests(sample_images)
    scheduler = engine.scheduler()
    handed = [[] for _ in requests]
    tickets = [scheduler.add(request, on_tokens=pieces.append) for request, pieces in zip(requests, handed)]
    plain = scheduler.add(Request(sample_images[2], TaskInput(Task.CAPTION), GenerationParams(max_new_tokens=30)))
    while scheduler.busy:
        scheduler.step()
    assert plain.result is not None
    for ticket, pieces in zip(tickets, handed):
        assert all(len(piece.tokens) <= 1 for piece in pieces)  # one token a step, nothing decoded on the engine thread
        streamed = "".join(read_all(engine.text_stream(), pieces))
        prompts = [[]]
        for piece in pieces:
            prompts[-1] += piece.tokens
            if piece.prompt_done:
                prompts.append([])
        assert len(prompts) - 1 == len(ticket.rows) and sum(map(len, prompts)) == ticket.result.generated_tokens
        assert read_all(engine.text_stream(), pieces) == old_streamer_pieces(engine, prompts[:-1])
        assert streamed == "".join(engine.decode(ids) for ids in prompts)
        for raw_text, ids in zip(ticket.result.raw_text.split("\n"), prompts):  # each prompt's answer ends in its text
            assert raw_text.endswith(engine.decode(ids)) and engine.decode(ids)


def old_streamer_pieces(engine, prompts):
    """What transformers' TextStreamer sent for these prompts' new tokens, run on the engine thread as it was."""
    sent = []
    streamer = TextStreamer(engine.processor.tokenizer, skip_special_tokens=True)
    streamer.on_finalized_text = lambda text, stream_end=False: sent.append(text)
    for ids in prompts:
        for token in ids:
            streamer.put(torch.tensor([token]))
        streamer.end()
    return [text for text in sent if text]


@pytest.mark.parametrize("interval", [0.0, 0.05])
def test_the_service_stream_yields_the_text_then_the_result_equal_to_the_request_alone(engine, sample_images,
                                                                                      interval):
    """Every settled piece, in order, whether each token wakes the event loop or they come together (interval)."""
    requests = streamed_requests(sample_images)

    async def serve():
        batcher = Batcher(engine, max_requests=4, batch_timeout=0.0, max_queue=8, stream_interval=interval)
        batcher.start()
        try:
            async def consume(request):
                return [piece async for piece in batcher.stream(request)]

            return await asyncio.gather(*map(consume, requests), batcher.submit(requests[0]))
        finally:
            await batcher.stop()

    *streams, plain = asyncio.run(serve())
    for request, pieces in zip(requests, streams):
        *texts, result = pieces
        alone = []
        scheduler = engine.scheduler()
        scheduler.add(request, on_tokens=alone.append)
        while scheduler.busy:
            scheduler.step()
        assert isinstance(result, Result) and texts and all(isinstance(text, str) and text for text in texts)
        assert texts == read_all(engine.text_stream(), alone)
        assert result.raw_text == engine.run([request])[0].raw_text
    assert plain.raw_text == streams[0][-1].raw_text


def test_pieces_handed_over_within_the_interval_wake_the_loop_once_and_keep_their_order():
    """Ten tokens from the engine thread: one wake-up to collect them later; a prompt's end hands over at once
    with the pieces before it, ahead of anything scheduled after it."""
    async def run():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        hand_off = _HandOff(loop, queue, interval=0.2)
        wake_ups = []
        original = loop.call_soon_threadsafe
        ours = (loop.call_later, hand_off._collect)  # the executor's own hand-backs are not counted
        loop.call_soon_threadsafe = lambda *args: (wake_ups.append(args[0]) if args[0] in ours else None,
                                                   original(*args))[1]

        def engine_thread():
            for token in range(10):
                hand_off(StreamPiece((token,)))

        await loop.run_in_executor(None, engine_thread)
        await asyncio.sleep(0.05)
        assert queue.empty() and len(wake_ups) == 1  # the collection is scheduled, not run yet
        await asyncio.sleep(0.3)
        collected = [queue.get_nowait() for _ in range(queue.qsize())]
        assert [piece.tokens for piece in collected] == [(token,) for token in range(10)]

        def a_prompt_ends():
            hand_off(StreamPiece((10,)))
            hand_off(StreamPiece(prompt_done=True))
            loop.call_soon_threadsafe(queue.put_nowait, None)  # what the result's end mark does

        await loop.run_in_executor(None, a_prompt_ends)
        await asyncio.sleep(0.01)
        ended = [queue.get_nowait() for _ in range(queue.qsize())]
        assert ended == [StreamPiece((10,)), StreamPiece(prompt_done=True), None]

    asyncio.run(run())
