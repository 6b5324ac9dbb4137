"""Training data: plain text (one sentence per line), supervised JSONL triplets, and a
deterministic, resumable batch schedule (the data position is just the step number)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

STSB_TRAIN = "stsb:train"  # pseudo data file: the unique sentences of STS-B train (labels unused)

logger = logging.getLogger(__name__)


def read_text_lines(paths: list[str]) -> list[str]:
    """Non-empty lines of plain-text files (``stsb:train`` stands for the STS-B train sentences)."""
    out: list[str] = []
    for path in paths:
        if path == STSB_TRAIN:
            from ..stsb import stsb_sentences

            out.extend(stsb_sentences("train"))
            continue
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data file {path!r} does not exist")
        out.extend(line.strip() for line in _lines(p) if line.strip())
    if not out:
        raise ConfigError(f"the training data {paths} holds no non-empty line")
    return out


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file (a leading byte order mark dropped), split at newlines only:
    ``str.splitlines`` also splits at U+2028, form feeds and other separators that JSON text and
    sentences may hold."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data file {str(path)!r} is not valid UTF-8 ({err})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


@dataclass(frozen=True)
class Triplet:
    """A supervised sample: ``query`` (optionally with an instruction, attended to but not pooled),
    a ``positive`` and a hard ``negative`` document, and the ``dataset`` it comes from."""

    instruction: str
    query: str
    positive: str
    negative: str
    dataset: str


def read_triplets(paths: list[str]) -> list[Triplet]:
    """JSONL lines ``{"query": ..., "positive": ..., "negative": ..., "dataset": ..., "instruction": ...}``;
    ``query`` may also be an ``[instruction, text]`` pair; ``dataset`` and ``instruction`` are optional."""
    out: list[Triplet] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data file {path!r} does not exist")
        for line_no, line in enumerate(_lines(p), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{line_no}: expected a JSON object")
            missing = [k for k in ("query", "positive", "negative") if k not in row]
            if missing:
                raise ConfigError(f"{path}:{line_no}: missing field(s) {missing}")
            query, instruction = row["query"], row.get("instruction", "")
            if isinstance(query, list) and len(query) == 2:
                instruction, query = query
            fields = dict(instruction=instruction, query=query, positive=row["positive"], negative=row["negative"])
            bad = [k for k, v in fields.items() if not isinstance(v, str)]
            if bad:
                raise ConfigError(f"{path}:{line_no}: field(s) {bad} must be strings")
            out.append(Triplet(dataset=str(row.get("dataset", "default")), **fields))
    if not out:
        raise ConfigError(f"the training data {paths} holds no sample")
    return out


class BatchSchedule:
    """Which sample indices form the batch of each step, reproducibly.

    Epoch ``e`` shuffles with a generator seeded by ``(seed, e)``. With ``groups`` (one label per
    sample, e.g. its dataset), every batch holds samples of a single group: each group is shuffled
    and cut into full batches (a remainder smaller than a batch is dropped), then the batches of all
    groups are shuffled together, as in the official supervised recipe. Without groups the samples are
    shuffled and cut into batches (the remainder is dropped too). ``batch(step)`` only depends on
    ``step``, so resuming at a step needs no other state.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int, groups: list[str] | None = None):
        self.n, self.batch_size, self.seed = int(n_samples), int(batch_size), int(seed)
        self.groups = groups
        if groups is not None:
            counts: dict[str, int] = {}
            for g in groups:
                counts[g] = counts.get(g, 0) + 1
            self.batches_per_epoch = sum(c // self.batch_size for c in counts.values())
            if self.batches_per_epoch == 0:
                raise ConfigError(f"no dataset has a full batch of {self.batch_size} samples (sizes: {counts}); lower batch_size")
            unused = {g: c for g, c in counts.items() if c < self.batch_size}
            if unused:
                logger.warning(
                    "datasets smaller than one batch of %d are never trained on (every batch holds one dataset): %s",
                    self.batch_size,
                    unused,
                )
        else:
            self.batches_per_epoch = self.n // self.batch_size
            if self.batches_per_epoch == 0:
                raise ConfigError(f"the data holds {self.n} samples, fewer than one batch of {self.batch_size}; lower batch_size")
        self._epoch, self._batches = -1, []

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)  # any seed: manual_seed takes 64 bits

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = self._generator(epoch)
        bs = self.batch_size
        if self.groups is None:
            order = torch.randperm(self.n, generator=g).tolist()
            return [order[i * bs : (i + 1) * bs] for i in range(self.n // bs)]
        by_group: dict[str, list[int]] = {}
        for i, name in enumerate(self.groups):
            by_group.setdefault(name, []).append(i)
        batches = []
        for name in sorted(by_group):
            idx = by_group[name]
            perm = torch.randperm(len(idx), generator=g).tolist()
            shuffled = [idx[j] for j in perm]
            batches.extend(shuffled[i * bs : (i + 1) * bs] for i in range(len(idx) // bs))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[j] for j in order]

    def batch(self, step: int) -> list[int]:
        epoch, pos = divmod(int(step), self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        return self._batches[pos]


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The part of a global batch that ``rank`` processes (contiguous, equal sizes)."""
    if len(indices) % world_size:
        raise ConfigError(f"batch_size {len(indices)} is not divisible by the world size {world_size}")
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]
