"""Token-budget dynamic batching (``llm2vec_fast.serve.batcher``) with a fake model: splitting,
merging, order, cancellation, queue limits, model errors, shutdown. No HTTP, no real model."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

pytest.importorskip("fastapi")

from llm2vec_fast.prompting import EncodingInput  # noqa: E402
from llm2vec_fast.serve.batcher import Batcher, BatcherStopped, QueueFull  # noqa: E402

HIDDEN = 3
TIMEOUT = 10


def item(tag: int, length: int) -> EncodingInput:
    return EncodingInput([tag] * length, length)


class FakeModel:
    """Embeds ``[tag, length, 1]`` per item; records every batch; can be held or made to fail."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_tag: int | None = None

    def __call__(self, items):
        self.started.set()
        assert self.gate.wait(TIMEOUT)
        tags = [x.input_ids[0] for x in items]
        self.batches.append(tags)
        if self.fail_tag in tags:
            raise RuntimeError("injected model failure")
        return torch.tensor([[x.input_ids[0], len(x.input_ids), 1.0] for x in items])


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def expected(items):
    return torch.tensor([[x.input_ids[0], len(x.input_ids), 1.0] for x in items])


@pytest.mark.parametrize("lengths, budget, n_batches", [([4, 4, 4, 4], 10, 2), ([3, 9, 2, 7, 1], 9, 4), ([5], 5, 1), ([12, 1], 10, 2)])
def test_request_over_the_budget_is_split_and_reassembled_in_order(lengths, budget, n_batches):
    model = FakeModel()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=budget, max_queue_tokens=1000)
        await batcher.start()
        items = [item(i, n) for i, n in enumerate(lengths)]
        out = await batcher.submit(items).future
        await batcher.stop()
        return items, out

    items, out = run(main())
    torch.testing.assert_close(out, expected(items))
    assert len(model.batches) == n_batches
    assert [t for b in model.batches for t in b] == list(range(len(lengths)))  # FIFO, nothing dropped or repeated


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=100, max_queue_tokens=1000)
        await batcher.start()
        first = batcher.submit([item(0, 5)])  # taken alone; the worker holds on it
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        jobs = [batcher.submit([item(10 * r + k, 2 + k) for k in range(r + 1)]) for r in range(1, 5)]
        assert batcher.queued_requests == 4 and batcher.queued_tokens == sum(2 + k for r in range(1, 5) for k in range(r + 1))
        model.gate.set()
        results = [await j.future for j in [first, *jobs]]
        await batcher.stop()
        return [first, *jobs], results

    jobs, results = run(main())
    assert model.batches == [[0], [10, 11, 20, 21, 22, 30, 31, 32, 33, 40, 41, 42, 43, 44]]
    for job, out in zip(jobs, results):
        torch.testing.assert_close(out, expected(job.items))


def test_batch_request_metrics():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=100, max_queue_tokens=1000)
        await batcher.start()
        first = batcher.submit([item(0, 5)])
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        others = [batcher.submit([item(r, 3)]) for r in range(1, 4)]
        model.gate.set()
        for j in [first, *others]:
            await j.future
        await batcher.stop()
        return batcher.metrics

    metrics = run(main())
    samples = {(s.name, s.labels.get("le")): s.value for m in metrics.batch_requests.collect() for s in m.samples}
    assert samples[("llm2vec_batch_requests_count", None)] == 2
    assert samples[("llm2vec_batch_requests_bucket", "1.0")] == 1  # the other batch merged 3 requests
    assert samples[("llm2vec_batch_requests_sum", None)] == 4
    assert metrics.registry.get_sample_value("llm2vec_embedded_tokens_total") == 5 + 3 * 3


def test_cancelled_request_leaves_the_queue_and_is_never_computed():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=10, max_queue_tokens=1000)
        await batcher.start()
        first = batcher.submit([item(1, 4)])
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        gone = batcher.submit([item(2, 6), item(3, 6)])
        kept = batcher.submit([item(4, 2)])
        batcher.cancel(gone)
        assert batcher.queued_tokens == 2 and batcher.queued_requests == 1
        model.gate.set()
        await first.future
        out = await kept.future
        await batcher.stop()
        return out, gone

    out, gone = run(main())
    assert gone.future.cancelled()
    assert model.batches == [[1], [4]]
    torch.testing.assert_close(out, expected([item(4, 2)]))


def test_full_queue_raises_queue_full_with_retry_after_and_recovers():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=8, max_queue_tokens=10)
        await batcher.start()
        running = batcher.submit([item(1, 8)])
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        queued = batcher.submit([item(2, 6)])
        with pytest.raises(QueueFull) as err:
            batcher.submit([item(3, 5)])
        assert err.value.retry_after >= 1 and "10 tokens" in str(err.value)
        assert batcher.queued_tokens == 6
        model.gate.set()
        await running.future
        await queued.future
        out = await batcher.submit([item(3, 5)]).future  # room again
        await batcher.stop()
        return out

    torch.testing.assert_close(run(main()), expected([item(3, 5)]))


def test_model_error_fails_only_that_batch():
    model = FakeModel()
    model.gate.clear()
    model.fail_tag = 7

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=6, max_queue_tokens=1000)
        await batcher.start()
        a = batcher.submit([item(1, 3)])
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        b = batcher.submit([item(2, 3), item(7, 3), item(8, 3)])  # 2 and 7 share a batch, 8 comes later
        c = batcher.submit([item(9, 3)])
        model.gate.set()
        await a.future
        with pytest.raises(RuntimeError, match="injected"):
            await b.future
        out_c = await c.future
        after = await batcher.submit([item(5, 2)]).future
        await batcher.stop()
        return out_c, after, batcher

    out_c, after, batcher = run(main())
    assert model.batches == [[1], [2, 7], [9], [5]]  # b's remaining text 8 was dropped with it
    torch.testing.assert_close(out_c, expected([item(9, 3)]))
    torch.testing.assert_close(after, expected([item(5, 2)]))
    assert batcher.queued_tokens == 0 and batcher.metrics.registry.get_sample_value("llm2vec_batch_failures_total") == 1


def test_stop_fails_waiting_requests_and_refuses_new_ones():
    model = FakeModel()
    model.gate.clear()

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=4, max_queue_tokens=100)
        await batcher.start()
        running = batcher.submit([item(1, 4)])
        await asyncio.to_thread(model.started.wait, TIMEOUT)
        waiting = batcher.submit([item(2, 4)])
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0)
        model.gate.set()
        await stopping
        with pytest.raises(BatcherStopped):
            batcher.submit([item(3, 1)])
        return running, waiting

    running, waiting = run(main())
    for job in (running, waiting):
        assert isinstance(job.future.exception(), BatcherStopped)


def test_bad_settings():
    with pytest.raises(ValueError, match="positive"):
        Batcher(FakeModel(), HIDDEN, max_batch_tokens=0, max_queue_tokens=10)
    with pytest.raises(ValueError, match="regroup_s"):
        Batcher(FakeModel(), HIDDEN, max_batch_tokens=4, max_queue_tokens=10, regroup_s=-1)


class SlowModel(FakeModel):
    """A fake model whose every batch takes ``seconds`` (as a CPU forward does)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def __call__(self, items):
        threading.Event().wait(self.seconds)
        return super().__call__(items)


def closed_loop_batches(clients: int, rounds: int, regroup_s: float, model_s: float = 0.04) -> list[int]:
    """Requests per batch when ``clients`` clients each send ``rounds`` requests one after another,
    coming back after a staggered think time (as HTTP clients do: the answers go out one by one)."""
    model = SlowModel(model_s)

    async def client(batcher, c):
        for _ in range(rounds):
            job = batcher.submit([item(c, 2)])
            assert torch.equal(await job.future, expected([item(c, 2)]))
            await asyncio.sleep(0.001 * (c % 8))

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=1000, max_queue_tokens=10_000, regroup_s=regroup_s)
        await batcher.start()
        await asyncio.gather(*(client(batcher, c) for c in range(clients)))
        await batcher.stop()

    run(main())
    assert sorted(tag for batch in model.batches for tag in batch) == sorted(list(range(clients)) * rounds)
    return [len(batch) for batch in model.batches]


def test_regrouping_keeps_concurrent_clients_in_one_batch():
    # without regrouping the first request runs alone and the rest take turns in cohorts
    assert min(closed_loop_batches(8, 5, regroup_s=0.0, model_s=0.2)[1:]) < 8
    sizes = closed_loop_batches(8, 5, regroup_s=0.5, model_s=0.4)  # waits up to 100 ms for returns within 7 ms
    assert sum(n < 8 for n in sizes[2:]) <= 1, sizes


def test_regrouping_never_delays_a_single_client_and_is_bounded():
    import time

    start = time.perf_counter()
    assert closed_loop_batches(1, 5, regroup_s=5.0, model_s=0.01) == [1] * 5
    assert time.perf_counter() - start < 4.0  # one client: nothing to wait for (waiting would take 25 s)
    # two clients, one of them gone after its first request: the other waits at most a quarter of a batch
    start = time.perf_counter()
    model = SlowModel(0.04)

    async def main():
        batcher = Batcher(model, HIDDEN, max_batch_tokens=1000, max_queue_tokens=100, regroup_s=5.0)
        await batcher.start()
        await asyncio.gather(batcher.submit([item(0, 2)]).future, batcher.submit([item(1, 2)]).future)
        for _ in range(4):
            await batcher.submit([item(0, 2)]).future
        await batcher.stop()

    run(main())
    assert time.perf_counter() - start < 4.0  # 4 x 10 ms of waiting, not 4 x 5 s


def test_server_defaults_agree_on_the_regrouping_wait():
    from llm2vec_fast.cli import build_parser
    from llm2vec_fast.serve.app import ServeSettings
    from llm2vec_fast.serve.batcher import DEFAULT_REGROUP_MS

    args = build_parser().parse_args(["serve"])
    assert args.regroup_ms == ServeSettings("m").regroup_ms == DEFAULT_REGROUP_MS
    assert Batcher(FakeModel(), HIDDEN, max_batch_tokens=4, max_queue_tokens=10).regroup_s == DEFAULT_REGROUP_MS / 1000
