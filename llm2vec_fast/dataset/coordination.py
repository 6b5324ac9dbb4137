"""How the processes of a job agree, with torch.distributed's key-value store (torchrun) or, for one
process, a dict: rank 0 shares the plan, every rank takes the next pending chunk from a shared
counter (so each chunk is handed out exactly once and fast ranks take more), progress counters are
summed for rank 0's bar, and rank 0 waits until every rank is done (a barrier that also notices a
rank that failed). No tensor collectives, so the same code runs over gloo on CPU and on GPUs.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

POLL_SECONDS = 0.2


class RankFailedError(RuntimeError):
    """Another rank of the job failed."""


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


class LocalCoordinator:
    """One process: counters in a dict."""

    rank, world = 0, 1

    def __init__(self):
        self._values: dict[str, object] = {}

    def share(self, key: str, compute):
        return compute()

    def add(self, key: str, amount: int) -> int:
        self._values[key] = int(self._values.get(key, 0)) + amount
        return self._values[key]

    def fail(self, message: str) -> None:
        pass

    def finish(self, on_wait=None) -> None:
        pass

    def publish_result(self, result: dict) -> None:
        self._result = result

    def wait_result(self) -> dict:
        return self._result

    def close(self) -> None:
        pass


class StoreCoordinator:
    """Ranks of a torchrun job, through the default process group's TCPStore."""

    def __init__(self, rank: int, world: int, prefix: str = "llm2vec_fast.encode_dataset"):
        import torch.distributed as dist

        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group("gloo", timeout=timedelta(minutes=30))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._store = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())

    def _check_failed(self) -> None:
        if self._store.check(["failed"]):
            raise RankFailedError(self._store.get("failed").decode())

    def _wait_key(self, key: str, on_wait=None) -> bytes:
        while not self._store.check([key]):
            self._check_failed()
            if on_wait is not None:
                on_wait()
            time.sleep(POLL_SECONDS)
        return self._store.get(key)

    def share(self, key: str, compute):
        """Rank 0 computes a JSON value, every rank gets it (or rank 0's error)."""
        if self.rank == 0:
            try:
                value = compute()
            except Exception as err:
                self.fail(f"{type(err).__name__}: {err}")
                raise
            self._store.set(key, json.dumps(value))
            return value
        return json.loads(self._wait_key(key))

    def add(self, key: str, amount: int) -> int:
        return int(self._store.add(key, amount))

    def fail(self, message: str) -> None:
        try:
            self._store.set("failed", f"rank {self.rank} failed: {message}")
        except Exception:  # the store may be gone already
            pass

    def finish(self, on_wait=None) -> None:
        """A barrier: mark this rank done; rank 0 returns once all ranks are done."""
        self.add("done", 1)
        if self.rank == 0:
            while self.add("done", 0) < self.world:
                self._check_failed()
                if on_wait is not None:
                    on_wait()
                time.sleep(POLL_SECONDS)

    def publish_result(self, result: dict) -> None:
        self._store.set("result", json.dumps(result))

    def wait_result(self) -> dict:
        return json.loads(self._wait_key("result"))

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
