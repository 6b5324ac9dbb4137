"""Supervised contrastive training on (query, positive, hard negative) triplets (LLM2Vec step 3,
supervised variant). Query instructions are attended to but not pooled. Every batch comes from a
single dataset (the JSONL ``dataset`` field), as in the official recipe. InfoNCE (scale 20) over
the positives, the hard negatives and the in-batch (all-ranks) negatives."""

from __future__ import annotations

from .contrastive import ContrastiveStage
from .data import BatchSchedule, read_triplets


class SupervisedStage(ContrastiveStage):
    name = "supervised"

    def load_data(self) -> BatchSchedule:
        self.samples = read_triplets(self.config.data_files())
        return BatchSchedule(len(self.samples), self.config.batch_size, self.config.seed, groups=[s.dataset for s in self.samples])

    def groups(self, indices):
        rows = [self.samples[i] for i in indices]
        queries = self.encoder._prepare([(r.instruction, r.query) for r in rows])
        positives = self.encoder._prepare([("", r.positive) for r in rows])
        negatives = self.encoder._prepare([("", r.negative) for r in rows])
        return [queries, positives, negatives]
