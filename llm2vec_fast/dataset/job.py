"""Steps every engine shares: load the encoder, plan, open the output folder, write the manifest."""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import FORMAT_VERSION, finished_chunks, prepare_output, read_manifest, write_manifest
from .plan import Plan
from .settings import job_settings
from .writer import shard_name


@dataclass(frozen=True)
class EncoderSpec:
    """How to build the encoder in a worker: ``LLM2Vec.from_pretrained(model, **kwargs)``."""

    model: str | None = None
    kwargs: dict = field(default_factory=dict)

    def load(self, local_rank: int = 0):
        import torch

        from ..encoder import LLM2Vec

        kwargs = dict(self.kwargs)
        if kwargs.get("device") is None:
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
                kwargs["device"] = f"cuda:{local_rank}"
            else:
                kwargs["device"] = "cpu"
        return LLM2Vec.from_pretrained(self.model, **kwargs)


def quiet_logs() -> None:
    """Warnings only from rank 0: silence library logs on the other ranks."""
    logging.getLogger("llm2vec_fast").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def expected_rows(plan: Plan):
    def rows(chunk: int) -> int:
        start, stop = plan.chunk_range(chunk)
        return stop - start - len(plan.skipped_in(start, stop))

    return rows


def start_job(out_dir: Path, plan: Plan, settings: dict, model_path: str | None, engine: str, overwrite: bool) -> list[int]:
    """Open the output folder (refusing other settings), write the incomplete manifest, and return
    the chunks without a complete shard."""
    prepare_output(out_dir, settings, overwrite)
    old = read_manifest(out_dir)
    done = finished_chunks(out_dir, plan.num_chunks, expected_rows(plan))
    write_manifest(
        out_dir,
        {
            "format_version": FORMAT_VERSION,
            "complete": False,
            "settings": settings,
            "model_path": model_path,
            "engine": engine,
            "runs": (old or {}).get("runs", 0) + 1,
            "created": (old or {}).get("created", now()),
            "updated": now(),
            "total_rows": plan.total_rows,
            "num_chunks": plan.num_chunks,
            "skipped": plan.skipped,
        },
    )
    return [c for c in range(plan.num_chunks) if c not in done]


def finish_job(out_dir: Path, plan: Plan, timings: dict, world_size: int) -> dict:
    """Check that every chunk has its shard and write the complete manifest. ``timings``: seconds of
    this run's phases as rank 0 / the driver saw them (``total``, ``plan``, ``load_model``, and
    ``model_settings``: the weights fingerprint, where the engine measures it)."""
    manifest = read_manifest(out_dir)
    done = finished_chunks(out_dir, plan.num_chunks, expected_rows(plan))
    missing = [c for c in range(plan.num_chunks) if c not in done]
    if missing:
        raise RuntimeError(
            f"{len(missing)} chunk(s) have no complete shard in {out_dir} (first: {shard_name(missing[0])}); rerun to resume"
        )
    shards = [
        {"file": shard_name(c), "chunk": c, "first_row": m["first_row"], "rows": m["rows"], "tokens": m["tokens"]}
        for c, m in sorted(done.items())
    ]
    manifest.update(
        {
            "complete": True,
            "updated": now(),
            "dimension": manifest["settings"]["model"]["dimension"],
            "dtype_out": manifest["settings"]["dtype_out"],
            "encoded_rows": sum(s["rows"] for s in shards),
            "skipped_rows": len(plan.skipped),
            "tokens": sum(s["tokens"] for s in shards),
            # tokens through the model, padding included (shards of older versions lack it: counted as unpadded)
            "forward_tokens": sum(m.get("forward_tokens", m["tokens"]) for m in done.values()),
            "encode_seconds": round(sum(m["seconds"] for m in done.values()), 3),
            "seconds": round(timings["total"], 3),
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "world_size": world_size,
            "shards": shards,
        }
    )
    write_manifest(out_dir, manifest)
    return manifest


def make_settings(encoder_info: dict, plan: Plan, options, on_bad_row: str, input_format: str | None) -> dict:
    return job_settings(encoder_info, plan, options, on_bad_row, input_format)
