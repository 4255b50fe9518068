"""Dynamic micro-batching: images from concurrent requests share one ONNX Runtime call.

An image waits at most `max_wait_ms` after it arrives for others to fill a batch of `max_batch_size`; images
that queued while every lane was busy go at once. Each lane (one `infer` callable, an ONNX Runtime runner's `run`
of its own) is a thread of its own that takes its next batch from a thread-safe queue the moment its call returns;
lanes x intra-op threads is the inference budget, split as `stages.throughput` measured fastest (on two cores, two
single-threaded lanes at batch 1 beat one two-threaded lane at any batch). When the event loop handed each lane its
batches, a lane waited between calls for the loop, busy with HTTP meanwhile: 2 cores sat 10-11 % idle at
concurrency 32.
"""
import asyncio
import contextlib
import os
import queue
import threading
import time

import numpy as np


def schedule(batch):
    """Run the calling thread, and the threads and processes it starts from now on, under Linux's SCHED_BATCH
    (`batch` true) or its normal policy; a no-op where the OS has neither. A SCHED_BATCH thread that wakes up waits
    for the running thread's time slice instead of preempting it. The server runs all but the lanes so (the event
    loop, the decode threads, nginx: serve/server.py). At concurrency 32 those had preempted each lane about 3
    times an image, and a lane ran an image about 14 % slower than in process. Three alternated pairs of 8 s rounds
    in one server: lanes preempted 1.2-1.3 times an image, 6.7-8.3 % more images/s; serve_bench alternated with
    and without: 0.90x and 0.89x of the limit at concurrency 32 against 0.86x and 0.82x (Intel Xeon, AVX-512, 2
    cores, 2026-12-07). In process, with no loop and no nginx, SCHED_BATCH decode threads changed nothing (155.9 img/s
    against 156.4), so the serving limit (stages/throughput.py) is timed without it."""
    policy = getattr(os, "SCHED_BATCH" if batch else "SCHED_OTHER", None)
    if policy is not None:
        with contextlib.suppress(OSError):      # a sandbox that forbids it costs speed, nothing else
            os.sched_setscheduler(0, policy, os.sched_param(0))


STOP = object()         # one per lane, queued behind the images: that lane serves what came before it and ends


class Batcher:
    def __init__(self, lanes, max_batch_size, max_wait_ms, on_batch=None):
        """`lanes`: callables, (n, ...) float32 array -> a list of arrays of n rows (the model's outputs), one
        batch at a time each; an image's result is the tuple of its rows. `on_batch(size, seconds)` after each
        call, on the lane's thread."""
        self.lanes, self.max_batch_size, self.max_wait = list(lanes), max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.queue = queue.SimpleQueue()           # (arrival time, array, future), oldest first
        self.threads, self.task, self.stopping = [], None, False

    @property
    def running(self):
        return self.task is not None and not self.task.done() and not self.stopping

    @property
    def dead(self):
        """A lane ended, or the task watching them did, while nobody asked them to stop."""
        return self.task is not None and self.task.done() and not self.stopping

    async def start(self):
        self.loop, self.ended = asyncio.get_running_loop(), asyncio.Event()
        self.threads = [threading.Thread(target=self._lane, args=(lane,), name=f"infer_{i}", daemon=True)
                        for i, lane in enumerate(self.lanes)]
        for t in self.threads:
            t.start()
        self.task = asyncio.create_task(self.ended.wait(), name="batcher")

    async def stop(self):
        """Serve what is queued, then stop."""
        self.stopping = True
        for _ in self.threads:
            self.queue.put(STOP)
        await asyncio.gather(*(asyncio.to_thread(t.join) for t in self.threads))
        if self.task:
            await asyncio.wait([self.task])          # it may have been cancelled: that is not this call's error

    async def submit(self, x):
        """One (C, H, W) array in, its output row back."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        future = self.loop.create_future()
        self.queue.put((time.monotonic(), x, future))
        return await future

    def _lane(self, lane):
        schedule(batch=False)                    # started from the loop's thread: back to the normal policy
        try:
            while (first := self.queue.get()) is not STOP:
                batch, last = [first], False
                while len(batch) < self.max_batch_size:
                    left = first[0] + self.max_wait - time.monotonic()
                    try:
                        item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is STOP:                 # this lane's own: the batch goes, then the lane ends
                        last = True
                        break
                    batch.append(item)
                # a request that was cancelled is not computed for (done() read off the loop: at worst one is)
                batch = [item for item in batch if not item[2].done()]
                if batch:
                    self._infer(lane, batch)
                if last:
                    return
        finally:
            try:
                self.loop.call_soon_threadsafe(self.ended.set)
            except RuntimeError:                     # the loop closed without stop(): nobody is left to tell
                pass

    def _infer(self, lane, batch):
        start = time.perf_counter()
        try:
            out = lane(np.stack([x for _, x, _ in batch]))
        except Exception as e:                       # every request in the batch learns of it; the lane goes on
            self.loop.call_soon_threadsafe(self._deliver, batch, None, e)
            return
        self.on_batch(len(batch), time.perf_counter() - start)
        self.loop.call_soon_threadsafe(self._deliver, batch, out, None)

    @staticmethod
    def _deliver(batch, out, error):                 # on the loop: futures are not thread-safe
        rows = zip(*out) if error is None else (None for _ in batch)
        for row, (_, _, future) in zip(rows, batch):     # per image: its row of every output
            if future.done():
                continue
            if error is None:
                future.set_result(row)
            else:
                future.set_exception(error)
