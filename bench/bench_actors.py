"""Actors against a multiprocessing equivalent: a child Process serving a Pipe, in the same run.

Run: python -m pytest bench/bench_actors.py --benchmark-enable --benchmark-only

The multiprocessing counterpart is a child Process that loops on ``recv()`` of a
``(method, args)`` request, runs the method on its object and ``send``s the result back.  It
uses two one-way ``multiprocessing.Pipe(duplex=False)`` (os.pipe) rather than one duplex Pipe
(a socketpair): a Unix socket charges each small message ~1 KiB of buffer, so 2,000 pipelined
replies fill it, the server blocks in send, stops reading, and the driver's 2,000 sends
deadlock.  A pipe packs the ~15-byte replies into 64 KiB and cannot.

Groups (compare within a group):
- actor-sync-call: ``ray.get(counter.inc.remote())`` against one request/response on the Pipe.
- actor-pipelined-2000: 2,000 ``inc.remote()`` then one get of all, against 2,000 sends then
  2,000 recvs.
- async-actor-call: a synchronous round trip to an actor whose ``inc`` is ``async def``, against
  the same Pipe server.

Module-scoped fixtures start shmray, the actors and the Pipe server once (outside the
timings); shmray is shut down and the server process is stopped and joined at the end.
"""

import multiprocessing

import pytest

import shmray
from benchstats import record_rate

MiB = 1 << 20
N_PIPELINED = 2000


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


class AsyncCounter:
    def __init__(self):
        self.n = 0

    async def inc(self):
        self.n += 1
        return self.n


class _PipeClient:
    def __init__(self, requests, replies):
        self.send = requests.send
        self.recv = replies.recv


def _serve(requests, replies, cls):
    obj = cls()
    while True:
        request = requests.recv()
        if request is None:
            break
        method, args = request
        replies.send(getattr(obj, method)(*args))
    replies.close()


def _rate(benchmark, calls):
    record_rate(benchmark, "calls_per_s", calls)


@pytest.fixture(scope="module")
def ray():
    shmray.init(num_cpus=2, object_store_memory=256 * MiB)
    yield shmray
    shmray.shutdown()


@pytest.fixture(scope="module")
def counter(ray):
    actor = ray.remote(Counter).remote()
    assert ray.get(actor.inc.remote()) == 1
    return actor


@pytest.fixture(scope="module")
def async_counter(ray):
    actor = ray.remote(AsyncCounter).remote()
    assert ray.get(actor.inc.remote()) == 1
    return actor


@pytest.fixture(scope="module")
def pipe_server():
    request_r, request_w = multiprocessing.Pipe(duplex=False)
    reply_r, reply_w = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.Process(target=_serve, args=(request_r, reply_w, Counter),
                                      daemon=True)
    process.start()
    request_r.close()
    reply_w.close()
    client = _PipeClient(request_w, reply_r)
    client.send(("inc", ()))
    assert client.recv() == 1
    yield client
    while reply_r.poll(0):  # a test that failed half-way may have left replies unread
        reply_r.recv()
    try:
        request_w.send(None)
    except OSError:
        pass
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join()
    request_w.close()
    reply_r.close()


def _pipe_call(conn):
    conn.send(("inc", ()))
    return conn.recv()


# --- actor-sync-call ---------------------------------------------------------------------

def test_sync_call_shmray(benchmark, ray, counter):
    benchmark.group = "actor-sync-call"
    benchmark(lambda: ray.get(counter.inc.remote()))
    _rate(benchmark, 1)


def test_sync_call_mp_pipe(benchmark, pipe_server):
    benchmark.group = "actor-sync-call"
    benchmark(_pipe_call, pipe_server)
    _rate(benchmark, 1)


# --- actor-pipelined-2000 ----------------------------------------------------------------

def test_pipelined_shmray(benchmark, ray, counter):
    benchmark.group = f"actor-pipelined-{N_PIPELINED}"

    def run():
        results = ray.get([counter.inc.remote() for _ in range(N_PIPELINED)])
        assert results[-1] - results[0] == N_PIPELINED - 1  # in order, none lost
        return results

    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)
    _rate(benchmark, N_PIPELINED)


def test_pipelined_mp_pipe(benchmark, pipe_server):
    benchmark.group = f"actor-pipelined-{N_PIPELINED}"
    # The 2,000 replies (~15 bytes each) fit in the reply pipe, so sending all before reading
    # cannot deadlock (see the module docstring).

    def run():
        for _ in range(N_PIPELINED):
            pipe_server.send(("inc", ()))
        results = [pipe_server.recv() for _ in range(N_PIPELINED)]
        assert results[-1] - results[0] == N_PIPELINED - 1
        return results

    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=1)
    _rate(benchmark, N_PIPELINED)


# --- async-actor-call --------------------------------------------------------------------

def test_async_actor_call_shmray(benchmark, ray, async_counter):
    benchmark.group = "async-actor-call"
    benchmark(lambda: ray.get(async_counter.inc.remote()))
    _rate(benchmark, 1)


def test_async_actor_call_mp_pipe(benchmark, pipe_server):
    benchmark.group = "async-actor-call"
    benchmark(_pipe_call, pipe_server)
    _rate(benchmark, 1)
