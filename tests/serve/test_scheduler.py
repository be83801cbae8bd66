"""The batching scheduler with the real tiny model: batching, answer routing, failure isolation."""

from __future__ import annotations

import re
import threading

from minigpt4.chat.generation import GenerationSettings
from minigpt4.chat.templates import Message
from minigpt4.serve.scheduler import BatchScheduler, Job

GREEDY = GenerationSettings(max_new_tokens=6, do_sample=False)


class Collector:
    """on_done callbacks that record what each job got."""

    def __init__(self) -> None:
        self.results: dict[str, tuple] = {}
        self.done = threading.Event()
        self.expected = 0

    def callback(self, name: str):
        def on_done(result, error) -> None:
            self.results[name] = (result, error)
            if len(self.results) == self.expected:
                self.done.set()
        return on_done


def prompt(engine, text: str) -> str:
    return engine.template.render([Message("user", text)], None)


def test_batches_route_answers_and_isolate_a_failing_job(serve_engine):
    texts = {name: f"Describe picture {name} please." for name in "abc"}
    alone = {name: serve_engine.generate([prompt(serve_engine, t)], [[]], GREEDY)[0] for name, t in texts.items()}

    scheduler = BatchScheduler(serve_engine.stream_batch, max_batch_size=8, max_wait_s=0.0)
    collector = Collector()
    jobs = [
        Job(prompt(serve_engine, texts["a"]), [], GREEDY, collector.callback("a")),
        # One <ImageHere> but no image: generate raises for any batch that holds this job.
        Job(prompt(serve_engine, "x") + "<ImageHere>", [], GREEDY, collector.callback("bad")),
        Job(prompt(serve_engine, texts["b"]), [], GREEDY, collector.callback("b"), n=2),
        Job(prompt(serve_engine, texts["c"]), [], GREEDY, collector.callback("c")),
    ]
    collector.expected = len(jobs)
    for job in jobs:  # queued before the worker starts, so the first batch takes them all
        scheduler.submit(job)
    scheduler.start()
    try:
        assert collector.done.wait(60)
        bad_result, bad_error = collector.results["bad"]
        assert bad_result is None and isinstance(bad_error, ValueError)
        for name in "abc":
            completions, error = collector.results[name]
            assert error is None
            assert len(completions) == (2 if name == "b" else 1)
            for completion in completions:
                assert completion.text == alone[name].text
                assert completion.prompt_tokens == alone[name].prompt_tokens
        # One failed batch of 5 rows, then each job alone (rows counted once per job). Jobs are answered
        # as their rows end, so wait for the worker to finish the batch before counting.
        scheduler.close()
        assert scheduler.stats()["batches"] == 1
    finally:
        scheduler.close()


def test_incompatible_settings_are_not_batched(serve_engine):
    scheduler = BatchScheduler(serve_engine.stream_batch, max_batch_size=8, max_wait_s=0.0)
    collector = Collector()
    other = GenerationSettings(max_new_tokens=6, do_sample=False, repetition_penalty=1.3)  # decodes differently
    jobs = [Job(prompt(serve_engine, "one"), [], GREEDY, collector.callback("1")),
            Job(prompt(serve_engine, "two"), [], other, collector.callback("2")),
            Job(prompt(serve_engine, "three"), [], GREEDY, collector.callback("3"))]
    collector.expected = len(jobs)
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    try:
        assert collector.done.wait(60)
        assert all(error is None for _, error in collector.results.values())
        scheduler.close()  # waits for the batch: its jobs were answered as their rows ended
        assert scheduler.stats()["batches"] == 2  # {one, three} together, {two} apart
    finally:
        scheduler.close()


def test_jobs_differing_in_max_tokens_and_stop_share_one_model_call(serve_engine):
    """Rows with their own max_new_tokens and stop strings (plain and streamed) run in one generate
    call, and each gets exactly the answer it gets alone: its own length, or its own stop."""
    prompts = {name: prompt(serve_engine, f"Tell me about {name}, please.") for name in ("short", "long", "stop", "s")}
    free = serve_engine.generate([prompts["stop"]], [[]], GREEDY.replace(max_new_tokens=12))[0]
    # A letter pair the (random) answer reaches after a few tokens, after undecodable bytes that stay.
    stop_at = re.findall("[A-Za-z]{2,}", free.text)[0][:2]
    assert free.finish_reason == "length" and free.text.index(stop_at) > 0
    settings = {"short": GREEDY.replace(max_new_tokens=2), "long": GREEDY.replace(max_new_tokens=11),
                "stop": GREEDY.replace(max_new_tokens=12, stop=[stop_at]), "s": GREEDY.replace(max_new_tokens=4)}
    alone = {name: serve_engine.generate([prompts[name]], [[]], settings[name])[0] for name in prompts}
    assert alone["short"].completion_tokens == 2 and alone["long"].completion_tokens == 11
    assert alone["short"].finish_reason == alone["long"].finish_reason == "length"
    assert alone["stop"].finish_reason == "stop" and alone["stop"].completion_tokens < 11
    assert alone["stop"].text == free.text[: free.text.index(stop_at)].strip()
    assert alone["s"].completion_tokens == 4

    scheduler = BatchScheduler(serve_engine.stream_batch, max_batch_size=8, max_wait_s=0.0)
    collector = Collector()
    collector.expected = 4
    calls = []
    hook = serve_engine.model.llm.register_forward_hook(lambda *args: calls.append(1))
    pieces: list[str] = []
    answered_at: dict[str, int] = {}  # forward passes run when each job got its answer

    def on_done(name: str):
        callback = collector.callback(name)
        return lambda result, error: (answered_at.setdefault(name, len(calls)), callback(result, error))

    for name in ("short", "long", "stop"):
        scheduler.submit(Job(prompts[name], [], settings[name], on_done(name)))
    scheduler.submit(Job(prompts["s"], [], settings["s"], on_done("s"), on_delta=pieces.append))
    scheduler.start()
    try:
        assert collector.done.wait(60)
        # Each job is answered at the step its row ends, not when the batch's longest row does.
        assert answered_at == {"short": 2, "s": 4, "stop": alone["stop"].completion_tokens, "long": 11}
        for name in ("short", "long", "stop"):
            assert collector.results[name] == ([alone[name]], None)
        assert collector.results["s"] == (alone["s"], None) and "".join(pieces) == alone["s"].text
        scheduler.close()  # waits for the batch: its jobs were answered as their rows ended
        assert scheduler.stats()["batches"] == 1 and scheduler.stats()["rows"] == 4
        assert len(calls) == 11  # one generate, as long as its longest row
    finally:
        hook.remove()
        scheduler.close()


def test_streams_are_batched_with_each_other_and_plain_jobs(serve_engine, photo):
    """8 streamed greedy jobs and a plain one share one model call; each gets exactly its answer alone."""
    image = serve_engine.pixels(photo)
    texts = [f"Tell story {i} about the picture." for i in range(9)]
    images = [[image] if i % 3 == 0 else [] for i in range(9)]
    prompts = [prompt(serve_engine, t) if not images[i] else
               serve_engine.template.render([Message("user", t, images=1)], None) for i, t in enumerate(texts)]
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    alone = [serve_engine.generate([p], [im], settings)[0] for p, im in zip(prompts, images, strict=True)]
    assert len({c.text for c in alone}) > 1  # a mix-up would show

    scheduler = BatchScheduler(serve_engine.stream_batch, max_batch_size=16, max_wait_s=0.0)
    collector = Collector()
    collector.expected = len(prompts)
    pieces: dict[str, list[str]] = {str(i): [] for i in range(8)}
    for i in range(8):
        job = Job(prompts[i], images[i], settings, collector.callback(str(i)), on_delta=pieces[str(i)].append)
        scheduler.submit(job)
    scheduler.submit(Job(prompts[8], images[8], settings, collector.callback("plain")))
    scheduler.start()
    try:
        assert collector.done.wait(60)
        for i in range(8):
            completion, error = collector.results[str(i)]
            assert error is None and completion == alone[i]
            assert "".join(pieces[str(i)]) == alone[i].text
        assert collector.results["plain"] == ([alone[8]], None)
        scheduler.close()  # waits for the batch: its jobs were answered as their rows ended
        assert scheduler.stats()["batches"] == 1 and scheduler.stats()["rows"] == 9
    finally:
        scheduler.close()


def test_a_failing_job_in_a_streamed_batch_fails_alone(serve_engine):
    scheduler = BatchScheduler(serve_engine.stream_batch, max_batch_size=8, max_wait_s=0.0)
    collector = Collector()
    collector.expected = 2
    good: list[str] = []
    scheduler.submit(Job(prompt(serve_engine, "x") + "<ImageHere>", [], GREEDY, collector.callback("bad"),
                         on_delta=lambda text: None))
    scheduler.submit(Job(prompt(serve_engine, "Hello there."), [], GREEDY, collector.callback("good"),
                         on_delta=good.append))
    scheduler.start()
    try:
        assert collector.done.wait(60)
        assert collector.results["bad"][0] is None and isinstance(collector.results["bad"][1], ValueError)
        completion, error = collector.results["good"]
        expected = serve_engine.generate([prompt(serve_engine, "Hello there.")], [[]], GREEDY)[0]
        assert error is None and completion == expected and "".join(good) == expected.text
    finally:
        scheduler.close()
