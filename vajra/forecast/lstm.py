"""A small LSTM over per-adapter arrival counts, trained online (the Predictive-LoRA approach).

Time is cut into ``bin_ms`` bins. Each adapter has a ring of its arrival counts for the last
``window + horizon`` completed bins plus the current one (one row of a shared array, so every
adapter's history lives in one block of memory). At every bin boundary:

* training: for up to ``batch_size`` adapters active in the ring (chosen at random), the model
  reads the ``window`` bins before the last ``horizon`` completed bins and learns to predict those
  ``horizon`` bins' counts (Poisson negative log-likelihood, ``steps_per_bin`` Adam steps); one
  model for every adapter, so a pattern learned on one helps the others;
* prediction (lazily, on the first question in a bin): one batched forward over every active
  adapter reads its last ``window`` completed bins and gives an arrival rate for each of the next
  ``horizon`` bins (the current one first);
* nowcast (at every question): the current bin's rate is updated by the arrivals it has seen
  so far, (forecast + arrivals) / (1 + elapsed fraction of the bin), a Gamma-Poisson update in
  which the forecast weighs one bin. Without it a function waking after a quiet spell was
  forecast idle for its whole first bin and evicted between its requests (the Azure 2019 day:
  +56.7% cold starts against reactive loading, +5.9% with it).

:meth:`LstmPredictor.predict_next` is the first moment from ``now_ms`` at which the expected
number of arrivals reaches ln 2 (at least one arrival is more likely than not), interpolated
inside a bin; None when that does not happen within the horizon or the adapter had no
arrival in its window. The forecast changes only at bin boundaries (:meth:`stable_until`, when
the prefetcher re-plans); the nowcast also with each arrival (which re-plans the adapter) and as
the bin goes by (read afresh by every question, eviction's included).

Input: log1p of counts over the adapter's scale (its mean count in the window, at least one
arrival per window), shape ``[adapters, window, 1]``; model: LSTM(1 -> hidden) then a linear
layer to ``horizon`` relative rates through softplus, times the scale (DeepAR's scaling: one
model learns the shape of arrivals for adapters whose levels differ by orders of magnitude, and
an untrained model already answers about the adapter's own recent rate; without it, busy
adapters got rates far below their counts and were forecast as idle). CPU only; runs on the caller's thread
(the simulator's loop, or the predictor actor through ``trio.to_thread``) and never blocks on
I/O. Arrivals older than the ring are ignored; arrival times going backwards within the ring are
counted in their own bin. Errors: invalid parameters raise ``ValueError``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from vajra.policies.placement import AdapterKey

_LN2 = math.log(2.0)


class _Net(nn.Module):
    def __init__(self, hidden: int, horizon: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, window, 1] -> [n, horizon]
        out, _ = self.lstm(x)
        rates: torch.Tensor = nn.functional.softplus(self.head(out[:, -1, :]))
        return rates


class LstmPredictor:
    """Online LSTM arrival forecaster, batched across adapters; see the module docstring."""

    proactive = True

    def __init__(
        self,
        *,
        bin_ms: float = 60_000.0,
        window: int = 16,
        horizon: int = 8,
        hidden: int = 16,
        batch_size: int = 256,
        steps_per_bin: int = 1,
        lr: float = 0.01,
        seed: int = 0,
    ) -> None:
        if not (math.isfinite(bin_ms) and bin_ms > 0):
            raise ValueError("bin_ms must be finite and > 0")
        if min(window, horizon, hidden, batch_size) < 1 or steps_per_bin < 0 or not lr > 0:
            raise ValueError("window, horizon, hidden, batch_size >= 1; steps >= 0; lr > 0")
        self.bin_ms = float(bin_ms)
        self.window = window
        self.horizon = horizon
        self.batch_size = batch_size
        self.steps_per_bin = steps_per_bin
        self.ring = window + horizon + 1
        torch.manual_seed(seed)
        self._rng = random.Random(seed)
        self.net = _Net(hidden, horizon)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self._rows: dict[AdapterKey, int] = {}
        self._counts = np.zeros((0, self.ring), dtype=np.float32)
        self._bin: int | None = None
        self._rates: tuple[dict[AdapterKey, int], np.ndarray] | None = None
        self.trained_steps = 0
        self.last_loss: float | None = None

    # --- ArrivalPredictor -----------------------------------------------------------------

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        b = int(t_ms // self.bin_ms)
        self._advance(b)
        if self._bin is None or b <= self._bin - self.ring:
            return  # older than the ring
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = len(self._rows)
            if row >= len(self._counts):
                grown = np.zeros((max(64, 2 * len(self._counts)), self.ring), dtype=np.float32)
                grown[: len(self._counts)] = self._counts
                self._counts = grown
        self._counts[row, b % self.ring] += 1.0
        if b < self._bin:
            self._rates = None  # a late arrival changes a completed bin

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        return self.predict_many([key], now_ms)[0]

    def predict_many(self, keys: list[AdapterKey], now_ms: float) -> list[float | None]:
        """Batched: one forward over every active adapter per bin, then vectorised lookups."""
        self._advance(int(now_ms // self.bin_ms))
        pos, table = self._all_rates()
        if not keys or self._bin is None:
            return [None] * len(keys)
        idx = np.array([pos.get(k, -1) for k in keys], dtype=np.int64)
        rates = np.vstack([table, np.zeros((1, self.horizon), dtype=np.float32)])[idx]
        rates = rates.astype(np.float64)
        starts = self._bin * self.bin_ms + np.arange(self.horizon) * self.bin_ms
        # Nowcast: the current bin's rate is updated by its arrivals so far (a Gamma-Poisson
        # update, the forecast weighing one bin), so an adapter waking after a quiet spell is
        # not forecast idle until its bin completes, nor a busy one kept after it went quiet.
        elapsed = min(max((now_ms - starts[0]) / self.bin_ms, 0.0), 1.0)
        rows = [self._rows.get(k, -1) for k in keys]
        current = np.array(
            [self._counts[r, self._bin % self.ring] if r >= 0 else 0.0 for r in rows],
            dtype=np.float64,
        )
        rates[:, 0] = (rates[:, 0] + current) / (1.0 + elapsed)
        lo = np.maximum(starts, now_ms)
        frac = np.clip((starts + self.bin_ms - lo) / self.bin_ms, 0.0, 1.0)
        expected = rates * frac
        cum = np.cumsum(expected, axis=1)
        reached = cum >= _LN2
        first = reached.argmax(axis=1)
        at = np.arange(len(keys))
        before = cum[at, first] - expected[at, first]
        rate = np.maximum(rates[at, first], 1e-12)
        when = lo[first] + (_LN2 - before) / rate * self.bin_ms
        ok = [bool(v) for v in np.asarray(reached.any(axis=1)).ravel()]
        return [float(w) if good else None for w, good in zip(when.tolist(), ok, strict=True)]

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        if key not in self._rows:
            return math.inf
        return (math.floor(now_ms / self.bin_ms) + 1) * self.bin_ms

    def forget(self, key: AdapterKey) -> None:
        row = self._rows.get(key)
        if row is not None:
            self._counts[row] = 0.0  # the row stays allocated; it is simply inactive

    # --- introspection for tests and the simulator ----------------------------------------

    def rates(self, keys: list[AdapterKey], now_ms: float) -> np.ndarray:
        """Predicted arrivals per bin for the next ``horizon`` bins, [len(keys), horizon]."""
        self._advance(int(now_ms // self.bin_ms))
        pos, table = self._all_rates()
        out = np.zeros((len(keys), self.horizon), dtype=np.float32)
        for i, k in enumerate(keys):
            if k in pos:
                out[i] = table[pos[k]]
        return out

    # --- internals ------------------------------------------------------------------------

    def _ordered(self, rows: np.ndarray, end_bin: int, length: int) -> np.ndarray:
        """Counts of bins [end_bin - length, end_bin) for ``rows``, oldest first."""
        cols = [(b % self.ring) for b in range(end_bin - length, end_bin)]
        out: np.ndarray = self._counts[rows][:, cols]
        return out

    def _advance(self, b: int) -> None:
        if self._bin is None:
            self._bin = b
            return
        if b <= self._bin:
            return
        steps = min(b - self._bin, self.ring)
        for i in range(1, steps + 1):
            self._counts[:, (self._bin + i) % self.ring] = 0.0
            self._bin_completed(self._bin + i)  # trains on what just completed
        self._bin = b
        self._rates = None

    def _active_rows(self) -> tuple[list[AdapterKey], np.ndarray]:
        n = len(self._rows)
        if n == 0:
            return [], np.zeros(0, dtype=np.int64)
        live = self._counts[:n].sum(axis=1) > 0
        keys = list(self._rows)
        idx = np.nonzero(live)[0]
        return [keys[i] for i in idx], idx

    def _bin_completed(self, new_bin: int) -> None:
        if self.steps_per_bin == 0:
            return
        _, rows = self._active_rows()
        if len(rows) == 0:
            return
        if len(rows) > self.batch_size:
            rows = np.array(sorted(self._rng.sample(list(rows), self.batch_size)))
        xt, scale = self._scaled(self._ordered(rows, new_bin - self.horizon, self.window))
        yt = torch.from_numpy(self._ordered(rows, new_bin, self.horizon))
        self.net.train()
        for _ in range(self.steps_per_bin):
            self.opt.zero_grad()
            rates = self.net(xt) * scale
            loss = nn.functional.poisson_nll_loss(rates, yt, log_input=False)
            loss.backward()  # type: ignore[no-untyped-call]
            self.opt.step()
            self.trained_steps += 1
            self.last_loss = float(loss.detach())

    def _scaled(self, counts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input for ``counts`` [n, window]: log1p of each row over its scale, and
        the scales [n, 1] (the row's mean count, at least one arrival per window)."""
        scale = np.maximum(counts.mean(axis=1, keepdims=True), 1.0 / self.window)
        x = torch.from_numpy(np.log1p(counts / scale).astype(np.float32)).unsqueeze(-1)
        return x, torch.from_numpy(scale.astype(np.float32))

    def _all_rates(self) -> tuple[dict[AdapterKey, int], np.ndarray]:
        if self._rates is not None:
            return self._rates
        keys, rows = self._active_rows()
        if not keys or self._bin is None:
            self._rates = ({}, np.zeros((0, self.horizon), dtype=np.float32))
            return self._rates
        x, scale = self._scaled(self._ordered(rows, self._bin, self.window))
        self.net.eval()
        with torch.inference_mode():
            out = (self.net(x) * scale).numpy()
        self._rates = ({k: i for i, k in enumerate(keys)}, out)
        return self._rates
