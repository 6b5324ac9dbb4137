"""CPU engines timed each in its own process, taking turns batch by batch (benchmarks only).

Why a process per engine: worker threads spin-wait after a run (torch's OpenMP, ONNX Runtime's
pool, OpenVINO's), so in one process an engine timed after another shares the cores with the
previous engine's threads. Measured on 2 cores, torch fp32 then ONNX int8 back to back in one
process: int8 1.5-1.6 s per 128 sentences, 1.0-1.1 s after a 1 s pause. A process waiting on its
pipe has no threads running.

Why batch by batch: on a shared (virtual) machine one core can run at half speed for seconds at
a time (measured here: a pure-Python loop pinned to each of 2 vCPUs swung between 423 and 715
iterations per second, each core on its own), and a 2-thread engine then runs at 1-thread speed.
Engines that take turns on the same batch see the same machine, so their ratio is far steadier
than the ratio of two whole runs a few seconds apart.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Engine = Callable[[list, int], object]


@dataclass(frozen=True)
class EngineSpec:
    """How a worker builds its engine.

    ``kind``: ``"torch"`` (``LLM2Vec.encode`` in fp32), ``"torch-bf16"`` (a bf16 copy of it),
    ``"torch-plain-forward"`` (:func:`plain_forward`, the baseline's sanity check) or ``"onnx"``
    (``OnnxEncoder`` on ``folder`` with ``runtime`` and, for OpenVINO, ``inference_precision``).
    """

    kind: str
    model: str | None = None
    peft: tuple[str, ...] | None = None
    folder: str | None = None
    runtime: str = "onnxruntime"
    inference_precision: str | None = None


def plain_forward(encoder) -> Engine:
    """``texts -> embeddings`` with the encoder's transformers model called directly on the same
    padded batches as ``encode`` (mean pooling in plain torch): the sanity check of the baseline."""
    import torch

    def run(texts, batch_size):
        items = encoder.tokenize(texts)
        out = []
        with torch.inference_mode():
            for idx in encoder._batches(items, batch_size):
                b = encoder.padded_batch([items[i] for i in idx])
                hidden = encoder.model(
                    input_ids=torch.from_numpy(b["input_ids"]), attention_mask=torch.from_numpy(b["attention_mask"])
                ).last_hidden_state
                m = torch.from_numpy(b["pool_mask"]).unsqueeze(-1).float()
                out.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
        return torch.cat(out)

    return run


def build_engine(spec: EngineSpec, threads: int) -> Engine:
    """The ``(texts, batch_size) -> embeddings`` function ``spec`` describes, on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    if spec.kind == "onnx":
        from llm2vec_fast.export import OnnxEncoder

        kwargs = {"inference_precision": spec.inference_precision} if spec.inference_precision else {}
        runner = OnnxEncoder.from_pretrained(spec.folder, num_threads=threads, runtime=spec.runtime, **kwargs)
        return lambda texts, bs: runner.encode(texts, batch_size=bs, convert_to_numpy=True)
    from llm2vec_fast import LLM2Vec

    peft = list(spec.peft) if spec.peft else None
    encoder = LLM2Vec.from_pretrained(spec.model, peft_model_name_or_path=peft, merge_peft=True, dtype="float32", device="cpu")
    if spec.kind == "torch":
        return lambda texts, bs: encoder.encode(texts, batch_size=bs, convert_to_numpy=True)
    if spec.kind == "torch-bf16":
        from llm2vec_fast.export.calibrate import bf16_copy

        bf16 = bf16_copy(encoder, fp32_accumulated_linears=False)  # timed as users run torch bf16
        del encoder
        return lambda texts, bs: bf16.encode(texts, batch_size=bs, convert_to_numpy=True)
    if spec.kind == "torch-plain-forward":
        return plain_forward(encoder)
    raise ValueError(f"unknown engine kind {spec.kind!r}")


def _serve(conn, spec: EngineSpec, threads: int, warmup: list, batch_size: int) -> None:
    try:
        engine = build_engine(spec, threads)
        engine(warmup, batch_size)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while (message := conn.recv()) is not None:
        texts, bs = message
        start = time.perf_counter()
        engine(texts, bs)
        conn.send(("seconds", time.perf_counter() - start))


class EngineProcess:
    """One engine in a spawned process: :meth:`time` runs it on texts and returns the seconds the
    call took inside that process."""

    def __init__(self, name: str, spec: EngineSpec, threads: int, warmup: list, batch_size: int):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads inherited
        self.name = name
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec, threads, warmup, batch_size), daemon=True)
        self._process.start()
        child.close()
        self._receive("ready")

    def _receive(self, expected: str):
        try:
            kind, value = self._conn.recv()
        except EOFError as err:
            raise RuntimeError(f"engine {self.name!r}: its process exited (code {self._process.exitcode})") from err
        if kind == "error":
            raise RuntimeError(f"engine {self.name!r} failed in its process:\n{value}")
        assert kind == expected, (kind, expected)
        return value

    def time(self, texts: list, batch_size: int) -> float:
        self._conn.send((texts, batch_size))
        return self._receive("seconds")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()


def time_in_turns(
    engines: dict[str, EngineProcess],
    batches: Sequence[list],
    batch_size: int,
    rounds: int,
    pause_s: float,
    before_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per round and engine: in each round every batch is run by every engine in turn (the
    order rotated per batch and round, ``pause_s`` before each call), and an engine's round time
    is the sum over the batches."""
    names = list(engines)
    seconds = {name: [] for name in names}
    for r in range(rounds):
        if before_round:
            before_round(r)
        totals = dict.fromkeys(names, 0.0)
        for i, batch in enumerate(batches):
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                time.sleep(pause_s)
                totals[name] += engines[name].time(batch, batch_size)
        for name in names:
            seconds[name].append(totals[name])
    return seconds
