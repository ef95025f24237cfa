"""Rollouts sampled ahead of training, on a fixed lag (`rollout.max_staleness`).

With lag k = 0 a step samples its batch itself, from the weights after the previous step: the
synchronous loop. With k >= 1 (server mode: samplers on their own GPUs or nodes) the batch of step b
is always sampled by the weights after step b - 1 - k (the initial weights for the first k + 1
batches), in a background thread while the trainer scores and updates earlier batches:

    after the update of step t:  wait for the batches in flight (their weights are older than t),
                                 push the weights of step t (no request is running: a push never
                                 races a sample), then start the batch of step t + k + 1

so sampling and training overlap for up to k steps. The schedule, not timing, decides which
weights sample what: with seeded requests a run is deterministic for its seed, and a resume repeats
it. A checkpoint after step t holds the finished batches t + 1 .. t + k (their positions and
rollouts) and the data cursor from before the batch in flight (t + k + 1), which the resumed run
samples again from the checkpoint's own weights, as the uninterrupted run did.

Every rollout carries the weights version that sampled it (`policy_version`: the step after which
they were taken, 0 = initial); the trainer corrects for the lag with the behaviour log-probs
(`grpo.mismatch_correction`), as it does for sampler/trainer kernel mismatch.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from rntp.data import Position
from rollout import Rollout

Batch = tuple[list[Position], list[Rollout]]


class RolloutQueue:
    def __init__(self, *, lag: int, last: int, draw: Callable[[], list[Position]],
                 sample: Callable[[list[Position], int], list[Rollout]], stream_state: Callable[[], dict]):
        """`draw` takes the next positions from the data stream, `sample(positions, step)` samples the
        batch of `step` from whatever weights the sampler holds, `stream_state` is the data cursor;
        no batch is started past step `last`."""
        self.lag, self.last, self._draw, self._sample, self._stream_state = lag, last, draw, sample, stream_state
        self.waited_s = 0.0  # seconds the trainer waited for batches since the last metrics
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rollouts") if lag else None
        self.batches: dict[int, Future | Batch] = {}  # step -> its batch (done) or the job sampling it
        self.cursor_before: dict[int, dict] = {}  # step -> the data cursor before its positions were drawn
        self.next_step = 1  # the next batch to start
        self.jobs: list[tuple[float, float]] = []  # (start, end) of finished jobs, appended by the worker
        self.running_since: float | None = None  # start of the job running now
        self._window = time.perf_counter()

    @staticmethod
    def version(step: int, lag: int) -> int:
        """The weights that sample the batch of `step`: those after step `step - 1 - lag` (0: initial)."""
        return max(0, step - 1 - lag)

    def start(self, first_step: int, done: dict[int, Batch] | None = None) -> None:
        """Fill the pipeline at the run's first step: batches a checkpoint saved, then new ones up to
        `first_step + lag`, all from the weights the sampler holds now (version first_step - 1)."""
        self.next_step = first_step
        for step, batch in sorted((done or {}).items()):
            self.batches[step] = batch
            self.next_step = step + 1
        while self.lag and self.next_step <= min(first_step + self.lag, self.last):
            self._launch()

    def _launch(self) -> None:
        step = self.next_step
        if step > self.last:
            return
        self.cursor_before[step] = self._stream_state()
        positions = self._draw()
        version = self.version(step, self.lag)

        def job() -> Batch:
            t = self.running_since = time.perf_counter()
            rollouts = self._sample(positions, step)
            for r in rollouts:
                r.policy_version = version
            self.jobs.append((t, time.perf_counter()))
            self.running_since = None
            return positions, rollouts

        self.batches[step] = self.pool.submit(job)
        self.next_step += 1

    def take(self, step: int) -> Batch:
        """The batch of `step` (positions and rollouts)."""
        if not self.lag:  # the synchronous loop: draw and sample now
            positions = self._draw()
            rollouts = self._sample(positions, step)
            for r in rollouts:
                r.policy_version = step - 1
            return positions, rollouts
        t = time.perf_counter()
        batch = self.batches.pop(step)
        batch = batch.result() if isinstance(batch, Future) else batch
        self.cursor_before.pop(step, None)
        self.waited_s += time.perf_counter() - t
        return batch

    def drain(self) -> float:
        """Wait for every batch in flight (before a weight push, an evaluation or a checkpoint); seconds waited."""
        t = time.perf_counter()
        for step, batch in list(self.batches.items()):
            if isinstance(batch, Future):
                self.batches[step] = batch.result()
        self.waited_s += time.perf_counter() - t
        return time.perf_counter() - t

    def after_push(self) -> None:
        """The weights of the step just trained are on the samplers: start the batch they sample."""
        if self.lag:
            self._launch()

    def take_idle(self) -> float:
        """Seconds the sampler was idle since the last call: the window's wall time minus the parts of
        it that jobs ran in (the one running now included)."""
        now, start, running = time.perf_counter(), self._window, self.running_since
        busy = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self.jobs)
        busy += max(0.0, now - max(running, start)) if running is not None else 0.0
        self.jobs = [(b, e) for b, e in self.jobs if e > now]
        self._window = now
        return max(0.0, now - start - busy)

    def add_metrics(self, row, step: int, rollouts: list[Rollout]) -> None:
        """async/*: how old the weights that sampled this step's batch were, and the idle time of the
        trainer (waiting for batches) and of the sampler (between jobs) since the last step's metrics."""
        staleness = [step - 1 - r.policy_version for r in rollouts]
        row.add({"async/staleness_mean": sum(staleness) / max(len(staleness), 1)})
        row.add({"async/staleness_max": max(staleness, default=0), "async/trainer_idle_s": self.waited_s,
                 "async/sampler_idle_s": self.take_idle()}, "max")
        self.waited_s = 0.0

    def state(self) -> tuple[dict, dict[int, Batch]]:
        """For a checkpoint: the data cursor from before the first batch not yet finished (the resumed
        run samples it again, from the weights it resumes with, as this one does), and the finished
        batches ahead of training."""
        done = {s: b for s, b in self.batches.items() if not isinstance(b, Future)}
        running = sorted(s for s, b in self.batches.items() if isinstance(b, Future))
        cursor = self.cursor_before[running[0]] if running else self._stream_state()
        return cursor, done

    def close(self) -> None:
        """At the end no batch is in flight (none starts past the last step); on a stop request the one
        in flight is abandoned: the checkpoint's cursor has it sampled again on resume."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
