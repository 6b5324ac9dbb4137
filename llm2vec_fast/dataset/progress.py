"""The job's progress bar: rows/s (tqdm's rate) and tokens/s, on rank 0 only."""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total_rows: int, enabled: bool, desc: str = "Encoding dataset"):
        self._bar = tqdm(total=total_rows, unit="row", desc=desc, disable=not enabled, smoothing=0.1)
        self._t0 = time.perf_counter()
        self.rows = 0
        self.tokens = 0

    def set(self, rows: int, tokens: int) -> None:
        """Show the job's totals so far (summed over ranks)."""
        if rows > self.rows:
            self._bar.update(rows - self.rows)
        self.rows, self.tokens = max(rows, self.rows), max(tokens, self.tokens)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self._bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self._bar.close()
