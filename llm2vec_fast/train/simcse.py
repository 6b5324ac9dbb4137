"""Unsupervised SimCSE (LLM2Vec step 3): each sentence is embedded twice with dropout active
(attention dropout 0.3 by default, plus LoRA dropout); the two views are each other's positive and
every other sentence of the (all-ranks) batch is a negative. The two views are run as one batch of
``2B`` rows, so their dropout masks are independent draws."""

from __future__ import annotations

from .contrastive import ContrastiveStage
from .data import BatchSchedule, read_text_lines


class SimCSEStage(ContrastiveStage):
    name = "simcse"

    def load_data(self) -> BatchSchedule:
        self.texts = read_text_lines(self.config.data_files())
        return BatchSchedule(len(self.texts), self.config.batch_size, self.config.seed)

    def groups(self, indices):
        items = self.encoder._prepare([("", self.texts[i]) for i in indices])
        return [items, list(items)]
