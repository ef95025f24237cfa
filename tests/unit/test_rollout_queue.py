"""The rollout queue's schedule, with a stand-in sampler whose thoughts name the weights it holds: the
batch of step t comes from the weights after step t - 1 - k; no push happens while a batch samples;
a checkpoint taken mid-pipeline resumes into the same batches."""

import threading
import time

import pytest

from rntp.rollout_queue import RolloutQueue
from rollout import Rollout

pytestmark = pytest.mark.unit


class Loop:
    """The trainer's side: a data stream of integers, a sampler holding a weights version, pushes."""

    def __init__(self, lag, steps, cursor=0, version=0, delay=0.0):
        self.cursor, self.version, self.delay, self.log = cursor, version, delay, []
        self.sampling = threading.Event()
        self.queue = RolloutQueue(lag=lag, last=steps, draw=self.draw, sample=self.sample,
                                  stream_state=lambda: {"cursor": self.cursor})

    def draw(self):
        self.cursor += 1
        return [self.cursor]

    def sample(self, positions, step):
        self.sampling.set()
        time.sleep(self.delay)
        held = self.version
        self.sampling.clear()
        return [Rollout(0, [positions[0]], [held], 1, True)]

    def run(self, first, last, done=None, stop_after=None):
        self.queue.start(first, done=done)
        for step in range(first, last + 1):
            positions, rollouts = self.queue.take(step)
            self.log.append((step, positions[0], rollouts[0].thought_ids[0], rollouts[0].policy_version))
            self.queue.drain()
            assert not self.sampling.is_set()  # a push never races a sample
            self.version = step  # push the weights after this step
            self.queue.after_push()
            if step == stop_after:
                return self.queue.state()
        self.queue.close()


@pytest.mark.parametrize("lag", [0, 1, 2, 3])
def test_the_batch_of_step_t_is_sampled_by_the_weights_after_step_t_minus_1_minus_k(lag):
    loop = Loop(lag, steps=8, delay=0.001)
    loop.run(1, 8)
    for step, position, held, tagged in loop.log:
        assert held == tagged == max(0, step - 1 - lag)
        assert position == step  # batches keep the data order
    assert loop.cursor == 8  # no batch drawn past the last step


@pytest.mark.parametrize("lag", [1, 2])
@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_a_checkpoint_with_batches_ahead_resumes_into_the_same_batches(lag, stop_after):
    whole = Loop(lag, steps=7)
    whole.run(1, 7)
    first = Loop(lag, steps=7)
    cursor, done = first.run(1, 7, stop_after=stop_after)
    first.queue.close()
    # resumed: the checkpoint's cursor, its finished batches, the weights after `stop_after`
    resumed = Loop(lag, steps=7, cursor=cursor["cursor"], version=stop_after)
    resumed.run(stop_after + 1, 7, done=done)
    assert first.log + resumed.log == whole.log
