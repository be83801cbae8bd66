"""Load, back-pressure and disconnects, all on loopback with the tiny model.

The load test starts the real `minigpt4 serve` command in a subprocess and sends the same 200
greedy requests twice: one at a time, then from 16 concurrent clients. Every concurrent answer must
equal the sequential answer to the same request (nothing lost, nothing mixed up) and nothing may
be a 5xx. The streamed load test does the same with 64 longer `stream: true` requests. Throughput
and latency of the runs are printed (run with -s to see them); no timing is asserted.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx
import pytest
from PIL import Image

from minigpt4.serve.config import ServeConfig

from .conftest import data_url, free_port, image_message, running_server, wait_for

REQUESTS = 200
CLIENTS = 16
MAX_TOKENS = 8
STREAMS = 64
STREAM_TOKENS = 32


@pytest.fixture(scope="module")
def cli_server(tiny_llm_dir, tmp_path_factory):
    """`minigpt4 serve --preset tiny llm.path=...` in a subprocess; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable, "-m", "minigpt4.cli", "serve", "--preset", "tiny", "--port", str(port),
        "--model-name", "tiny", "--max-batch-size", "8", "--batch-wait-ms", "10", "--max-queue", "64",
        f"llm.path={tiny_llm_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT4_API_KEY": ""}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"minigpt4 serve exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"minigpt4 serve did not come up:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield base
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def workload() -> list[dict]:
    """200 distinct greedy requests; every 5th carries one of two images."""
    images = [data_url(Image.new("RGB", (40, 30), colour)) for colour in ("red", "navy")]
    bodies = []
    for i in range(REQUESTS):
        text = f"Describe picture number {i} in {i % 7 + 1} words."
        message = image_message(images[i % 2], text) if i % 5 == 0 else {"role": "user", "content": text}
        bodies.append({"model": "tiny", "messages": [message], "max_tokens": MAX_TOKENS, "temperature": 0})
    return bodies


def send(client: httpx.Client, body: dict) -> tuple[int, dict, float]:
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    return response.status_code, response.json(), time.perf_counter() - start


def send_stream(client: httpx.Client, body: dict) -> tuple[int, str, float, float]:
    """A streamed request's status, joined content, latency and time to its first content piece."""
    start = time.perf_counter()
    pieces: list[str] = []
    first = None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                content = event["choices"][0]["delta"].get("content") if event["choices"] else None
                if content and first is None:
                    first = time.perf_counter() - start
                pieces.append(content or "")
    latency = time.perf_counter() - start
    return response.status_code, "".join(pieces), latency, latency if first is None else first


def run_load(base: str, bodies: list[dict], clients: int, send_fn=send) -> tuple[list, float]:
    """Send `bodies` from `clients` concurrent clients; results in request order and the wall time."""
    results: list = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                results[index] = send_fn(client, bodies[index])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(clients)]:
            future.result()
    return results, time.perf_counter() - start


def summary(name: str, results: list, wall: float) -> str:
    latencies = sorted(r[2] for r in results)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * len(latencies))) - 1)]
    return (f"{name:<22} {len(results)} requests in {wall:6.2f} s = {len(results) / wall:6.1f} req/s, "
            f"latency p50 {p50 * 1000:7.1f} ms, p95 {p95 * 1000:7.1f} ms")


def test_load_200_requests_16_clients(cli_server):
    bodies = workload()
    sequential, wall_seq = run_load(cli_server, bodies, clients=1)
    before = httpx.get(f"{cli_server}/health").json()
    concurrent_, wall_conc = run_load(cli_server, bodies, clients=CLIENTS)
    after = httpx.get(f"{cli_server}/health").json()

    statuses = [r[0] for r in sequential + concurrent_]
    assert not [s for s in statuses if s >= 500], "5xx answers"
    assert statuses == [200] * (2 * REQUESTS), f"non-200 answers: {sorted(set(statuses))}"
    ids = {r[1]["id"] for r in concurrent_}
    assert len(ids) == REQUESTS  # every request got its own response
    mixed = [
        i for i, (seq, conc) in enumerate(zip(sequential, concurrent_))
        if (seq[1]["choices"][0]["message"], seq[1]["usage"]) != (conc[1]["choices"][0]["message"], conc[1]["usage"])
    ]
    assert not mixed, f"{len(mixed)} answers differ from the sequential run, e.g. request {mixed[:3]}"
    # The answers are not all alike, so a mix-up would have been seen.
    assert len({r[1]["choices"][0]["message"]["content"] for r in sequential}) > 1

    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    print()
    print(summary("sequential (1 client)", sequential, wall_seq))
    print(summary(f"concurrent ({CLIENTS} clients)", concurrent_, wall_conc))
    print(f"concurrent run: {rows} rows in {batches} model calls = {rows / batches:.2f} rows per batch; "
          f"speed-up {wall_seq / wall_conc:.2f}x")
    assert rows == REQUESTS
    assert batches < REQUESTS  # concurrent requests were batched, not run one by one


def test_streamed_load_64_streams_16_clients(cli_server):
    """Streams are batched like plain requests: same texts as one at a time, fewer model calls than streams."""
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": f"Tell tale {i}, {i % 5 + 2} lines."}],
               "max_tokens": STREAM_TOKENS, "temperature": 0} for i in range(STREAMS)]
    sequential, wall_seq = run_load(cli_server, bodies, clients=1, send_fn=send_stream)
    before = httpx.get(f"{cli_server}/health").json()
    concurrent_, wall_conc = run_load(cli_server, bodies, clients=CLIENTS, send_fn=send_stream)
    after = httpx.get(f"{cli_server}/health").json()

    assert [r[0] for r in sequential + concurrent_] == [200] * (2 * STREAMS)
    mixed = [i for i, (seq, conc) in enumerate(zip(sequential, concurrent_)) if seq[1] != conc[1]]
    assert not mixed, f"{len(mixed)} streamed answers differ from the sequential run, e.g. request {mixed[:3]}"
    assert len({r[1] for r in sequential}) > 1

    batches = after["batches"] - before["batches"]
    rows = after["rows"] - before["rows"]
    ttft = lambda results: statistics.median(r[3] for r in results) * 1000  # noqa: E731
    print()
    print(summary("streamed, 1 client", sequential, wall_seq) + f", first token p50 {ttft(sequential):7.1f} ms")
    print(summary(f"streamed, {CLIENTS} clients", concurrent_, wall_conc)
          + f", first token p50 {ttft(concurrent_):7.1f} ms")
    print(f"concurrent streams: {rows} rows in {batches} model calls = {rows / batches:.2f} rows per batch; "
          f"speed-up {wall_seq / wall_conc:.2f}x")
    assert rows == STREAMS
    assert batches < STREAMS  # concurrent streams were batched, not run one by one


# ---------------------------------------------------------------- back-pressure and disconnects


@pytest.fixture(scope="module")
def small_queue_server(serve_engine):
    config = ServeConfig(model_name="tiny", max_queue=2, max_batch_size=2, max_n=2, batch_wait_ms=0,
                         max_tokens=1024, default_max_tokens=8)
    with running_server(serve_engine, config) as url:
        yield url


def test_full_queue_answers_429_with_retry_after(small_queue_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Describe the cat."}], "max_tokens": 48,
            "temperature": 0}
    with httpx.Client(base_url=small_queue_server, timeout=120) as client:
        expected = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=small_queue_server, timeout=120) as client:
            return client.post("/v1/chat/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 1, codes
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            error = response.json()["error"]
            assert error["type"] == "rate_limit_error" and "max_queue=2" in error["message"]
        else:
            assert response.json()["choices"][0]["message"]["content"] == expected
    assert httpx.get(f"{small_queue_server}/health").json()["queued"] == 0



def test_disconnects_free_their_slots(small_queue_server):
    """A stream whose client leaves stops generating; a queued request whose client leaves is dropped."""
    health = lambda: httpx.get(f"{small_queue_server}/health").json()  # noqa: E731
    start = health()
    long_stream = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me everything."}],
                   "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(base_url=small_queue_server, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json=long_stream) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            assert wait_for(lambda: health()["running"] == 1)
            # While the stream holds the model, a plain request queues; its client gives up after 0.5 s.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{small_queue_server}/v1/chat/completions", timeout=httpx.Timeout(5, read=0.5),
                           json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
            assert wait_for(lambda: health()["queued"] == 0)  # dropped from the queue, not run
        # Leaving the `with` closed the stream's connection mid-answer.
    assert wait_for(lambda: health()["running"] == 0 and health()["queued"] == 0)
    end = health()
    assert end["cancelled"] - start["cancelled"] == 2  # the queued request and the stream
    assert end["rows"] - start["rows"] == 1  # only the stream ever reached the model
    ok = httpx.post(f"{small_queue_server}/v1/chat/completions", timeout=60,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def read_stream(client: httpx.Client, body: dict) -> tuple[int, str]:
    """A streamed request's status and its joined content."""
    pieces = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                pieces.append(event["choices"][0]["delta"].get("content") or "")
        return response.status_code, "".join(pieces)


def test_streams_and_plain_requests_interleaved(cli_server):
    """Streams and plain requests at once, batched together: each gets its own answer."""
    bodies = [{"model": "tiny", "messages": [{"role": "user", "content": f"Story {i}: tell it."}],
               "max_tokens": MAX_TOKENS, "temperature": 0} for i in range(24)]
    with httpx.Client(base_url=cli_server, timeout=120) as client:
        expected = [send(client, body)[1]["choices"][0]["message"]["content"] for body in bodies]

    def one(index: int) -> tuple[int, str]:
        with httpx.Client(base_url=cli_server, timeout=120) as client:
            if index % 2:
                return read_stream(client, bodies[index])
            status, body, _ = send(client, bodies[index])
            return status, body["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(len(bodies))))
    assert [status for status, _ in answers] == [200] * len(bodies)
    assert [text for _, text in answers] == expected
