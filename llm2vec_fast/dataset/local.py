"""The local engine: one process, or one process per rank under ``torchrun`` (each with its GPU,
``LOCAL_RANK``). Multi-node works through torchrun's rendezvous; the output folder must be shared."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from .chunk_worker import ChunkWorker, JobOptions, group_size
from .coordination import LocalCoordinator, StoreCoordinator, distributed_env
from .job import expected_rows, finish_job, make_settings, quiet_logs, start_job
from .plan import Plan, make_plan
from .progress import Progress
from .settings import encoder_settings, model_path

_calls = itertools.count()  # each call of a torchrun job gets its own keys in the store


def run_local(
    paths: list[Path],
    out_dir: Path,
    options: JobOptions,
    *,
    load_encoder: Callable[[int], object],
    chunk_rows: int,
    on_bad_row: str,
    input_format: str | None,
    overwrite: bool,
    show_progress_bar: bool,
) -> dict:
    t0 = time.perf_counter()
    rank, world, local_rank = distributed_env()
    call = next(_calls)
    coord = StoreCoordinator(rank, world, prefix=f"llm2vec_fast.encode_dataset.{call}") if world > 1 else LocalCoordinator()
    if coord.rank != 0:
        quiet_logs()
    progress = None
    try:
        if coord.rank != 0:  # load while rank 0 plans
            encoder = load_encoder(local_rank)
        plan = Plan.from_json(coord.share("plan", lambda: make_plan(paths, options.fields, chunk_rows, on_bad_row, input_format).to_json()))
        t_plan = time.perf_counter() - t0
        if coord.rank == 0:
            encoder = load_encoder(local_rank)
        t_load = time.perf_counter() - t0 - t_plan
        info = encoder_settings(encoder)
        t_settings = time.perf_counter() - t0 - t_plan - t_load
        settings = make_settings(info, plan, options, on_bad_row, input_format)
        job = coord.share(
            "start",
            lambda: {
                "pending": start_job(out_dir, plan, settings, model_path(encoder), "local" if world == 1 else "torchrun", overwrite),
                "model": info,
            },
        )
        if job["model"] != info:
            raise RuntimeError(f"rank {coord.rank} loaded another model than rank 0 ({job['model']} != {info})")
        pending = job["pending"]
        rows_of = expected_rows(plan)
        progress = Progress(sum(rows_of(c) for c in pending), enabled=show_progress_bar and coord.rank == 0)

        def on_progress(rows: int, tokens: int) -> None:
            total_rows, total_tokens = coord.add("rows", rows), coord.add("tokens", tokens)
            if progress is not None:
                progress.set(total_rows, total_tokens)

        worker = ChunkWorker(encoder, plan, options, out_dir)
        try:
            # claim a group of pending chunks from the shared counter (atomic add: every chunk once)
            while (remaining := len(pending) - coord.add("next", 0)) > 0:
                k = group_size(plan.chunk_rows, remaining, coord.world)
                end = coord.add("next", k)
                mine = pending[max(0, end - k) : min(end, len(pending))]
                if mine:
                    worker.run_chunks(mine, on_progress)
            worker.flush()
        finally:
            worker.close()
        coord.finish(on_wait=lambda: progress.set(coord.add("rows", 0), coord.add("tokens", 0)))
        if coord.rank == 0:
            timings = {"total": time.perf_counter() - t0, "plan": t_plan, "load_model": t_load, "model_settings": t_settings}
            manifest = finish_job(out_dir, plan, timings, world)
            coord.publish_result(manifest)
            return manifest
        return coord.wait_result()
    except BaseException as err:
        coord.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        if progress is not None:
            progress.close()
        coord.close()
