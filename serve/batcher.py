"""Dynamic micro-batching: images from concurrent requests share one ONNX Runtime call.

An image waits at most `max_wait_ms` after it arrives for others to fill a batch of `max_batch_size`; images
that queued while every lane was busy go at once. Each lane (one `infer` callable, an ONNX Runtime runner's `run`
of its own) runs one batch at a time on a thread of its own; lanes x intra-op threads is the inference budget, split as
`stages.throughput` measured fastest (on two cores, two single-threaded lanes at batch 1 beat one two-threaded
lane at any batch).
"""
import asyncio
import collections
import concurrent.futures
import time

import numpy as np


class Batcher:
    def __init__(self, lanes, max_batch_size, max_wait_ms, on_batch=None):
        """`lanes`: callables, (n, ...) float32 array -> a list of arrays of n rows (the model's outputs), one
        batch at a time each; an image's result is the tuple of its rows. `on_batch(size, seconds)` after each
        call."""
        self.lanes, self.max_batch_size, self.max_wait = list(lanes), max_batch_size, max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size, seconds: None)
        self.pending = collections.deque()        # (arrival time, array, future), oldest first
        self.pool = concurrent.futures.ThreadPoolExecutor(len(self.lanes), thread_name_prefix="infer")
        self.task, self.stopping, self.inflight = None, False, set()

    @property
    def running(self):
        return self.task is not None and not self.task.done() and not self.stopping

    @property
    def dead(self):
        """The loop ended while nobody asked it to stop (an exception, a cancellation)."""
        return self.task is not None and self.task.done() and not self.stopping

    async def start(self):
        self.wakeup, self.idle = asyncio.Event(), asyncio.Queue()
        for lane in self.lanes:
            self.idle.put_nowait(lane)
        self.task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self):
        """Serve what is queued, then stop."""
        self.stopping = True
        if self.task:
            self.wakeup.set()
            await self.task
        self.pool.shutdown()

    async def submit(self, x):
        """One (C, H, W) array in, its output row back."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self.pending.append((time.monotonic(), x, future))
        self.wakeup.set()
        return await future

    async def _run(self):
        while self.pending or not self.stopping:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            lane = await self.idle.get()            # images queue meanwhile: they go together
            await self._fill()
            batch = []
            while self.pending and len(batch) < self.max_batch_size:
                item = self.pending.popleft()
                if not item[2].done():              # a request that was cancelled is not computed for
                    batch.append(item)
            if not batch:
                self.idle.put_nowait(lane)
                continue
            task = asyncio.create_task(self._infer(lane, batch))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        if self.inflight:
            await asyncio.wait(self.inflight)

    async def _fill(self):
        """Return once a full batch is queued or the oldest image has waited `max_wait`."""
        deadline = self.pending[0][0] + self.max_wait
        while len(self.pending) < self.max_batch_size and not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except TimeoutError:
                return

    async def _infer(self, lane, batch):
        start = time.perf_counter()
        try:
            x = np.stack([x for _, x, _ in batch])
            out = await asyncio.get_running_loop().run_in_executor(self.pool, lane, x)
        except Exception as e:                      # every request in the batch learns of it; the loop goes on
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        finally:
            self.idle.put_nowait(lane)
        self.on_batch(len(batch), time.perf_counter() - start)
        for row, (_, _, future) in zip(zip(*out), batch):      # per image: its row of every output
            if not future.done():
                future.set_result(row)
