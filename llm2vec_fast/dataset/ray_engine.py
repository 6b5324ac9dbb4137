"""The Ray Data engine: the pending chunks become a Ray dataset, ``map_batches`` sends them to a pool
of encoder actors (one model per actor, ``num_gpus=1`` each on GPU, ``concurrency`` actors), each
actor reads its chunk with the same streaming readers and writes its shard atomically.

Same chunk, shard and manifest contract as the local engine, so a job may be resumed with either
engine. Shards are written by the actors rather than by ``Dataset.write_parquet`` because resuming
needs deterministic, atomically renamed file names; Ray retries a chunk whose actor died, and a
retried chunk rewrites the same shard. Inputs and the output folder must be visible to every node.
"""

from __future__ import annotations

import time
from pathlib import Path

from .chunk_worker import ChunkWorker, JobOptions, group_size
from .job import EncoderSpec, expected_rows, finish_job, make_settings, quiet_logs, start_job
from .plan import Plan, make_plan
from .progress import Progress
from .settings import encoder_settings, model_path


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError('engine="ray" needs Ray Data: pip install "llm2vec-fast[ray]"') from None
    return ray


class _ChunkEncoderActor:
    """A Ray Data actor: one encoder, many chunks."""

    def __init__(self, spec: EncoderSpec, plan: dict, options: JobOptions, out_dir: str):
        quiet_logs()
        self.worker = ChunkWorker(spec.load(), Plan.from_json(plan), options, Path(out_dir))

    def __call__(self, batch: dict) -> dict:
        metas = self.worker.run_chunks([int(c) for c in batch["chunk"]])  # one length sort for the group
        self.worker.flush()  # the driver counts a chunk as done once its shard is on disk
        return {key: [m[key] for m in metas] for key in ("chunk", "rows", "tokens")}


def _describe_encoder(spec: EncoderSpec) -> dict:
    encoder = spec.load()
    return {"info": encoder_settings(encoder), "path": model_path(encoder)}


def run_ray(
    paths: list[Path],
    out_dir: Path,
    options: JobOptions,
    *,
    spec: EncoderSpec,
    chunk_rows: int,
    on_bad_row: str,
    input_format: str | None,
    overwrite: bool,
    show_progress_bar: bool,
    num_workers: int | None,
) -> dict:
    ray = _require_ray()
    t0 = time.perf_counter()
    plan = make_plan(paths, options.fields, chunk_rows, on_bad_row, input_format)  # fails before Ray starts any work
    t_plan = time.perf_counter() - t0
    if not ray.is_initialized():
        ray.init()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 and spec.kwargs.get("device") in (None, "cuda")
    if num_workers is None:
        num_workers = max(1, int(ray.cluster_resources().get("GPU" if use_gpu else "CPU", 1)))
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    described = ray.get(ray.remote(**resources)(_describe_encoder).remote(spec))
    t_load = time.perf_counter() - t0 - t_plan  # Ray start-up and one model load (actors load theirs during the run)
    settings = make_settings(described["info"], plan, options, on_bad_row, input_format)
    pending = start_job(out_dir, plan, settings, described["path"], "ray", overwrite)
    rows_of = expected_rows(plan)
    progress = Progress(sum(rows_of(c) for c in pending), enabled=show_progress_bar)
    ctx = ray.data.DataContext.get_current()
    ray_bars = ctx.enable_progress_bars
    try:
        if pending:
            ctx.enable_progress_bars = False  # ours shows rows/s and tokens/s
            group = group_size(plan.chunk_rows, len(pending), num_workers)  # chunks per actor call
            ds = ray.data.from_items([{"chunk": c} for c in pending], override_num_blocks=len(pending))
            ds = ds.map_batches(
                _ChunkEncoderActor,
                fn_constructor_kwargs=dict(spec=spec, plan=plan.to_json(), options=options, out_dir=str(out_dir)),
                batch_size=group,
                concurrency=min(num_workers, -(-len(pending) // group)),
                **resources,
            )
            rows = tokens = 0
            for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
                rows += int(batch["rows"].sum())
                tokens += int(batch["tokens"].sum())
                progress.set(rows, tokens)
    finally:
        ctx.enable_progress_bars = ray_bars
        progress.close()
    return finish_job(out_dir, plan, {"total": time.perf_counter() - t0, "plan": t_plan, "load_model": t_load}, num_workers)
