"""Bounded decoding for the server: a pixel budget per request, a bounded queue, two lanes, and no work for a client
that has gone.

Every image's header is read before any is decoded, so a request over `max_request_pixels` costs no decoding.
At most `max_decode_queue` images wait or decode at once; a request that would pass it gets 503 at once rather
than a place in a queue it cannot leave. Images up to `fast_lane_pixels` decode on `decode_threads` threads of
their own (the fast lane; headers are read there too), so a photo never waits behind a request of 6300x6300 16-bit
PNGs, which decode on as many others. Cancelling `run` (the client went away) drops the
images not yet started; one already decoding runs to its end, at most `decode_threads` images per pool.
"""
import asyncio
import concurrent.futures
import ctypes
import ctypes.util

import numpy as np

from serve.model import InputError, decode, open_image

try:                                    # glibc: hand freed heap pages back to the OS after a burst
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _malloc_trim = _libc.malloc_trim
    # A fixed mmap threshold: glibc raises it to the size of each freed mmapped block (up to 32 MiB), after which
    # Pillow's 16 MiB image blocks come from the heap arenas, where they stay resident; mmapped, they go back
    # to the OS the moment an image is freed. M_MMAP_THRESHOLD is -3 in glibc's malloc.h.
    _libc.mallopt(-3, 4 * 2 ** 20)
except (OSError, AttributeError, TypeError):
    _malloc_trim = None


# The burst is over once no image has been admitted for this long. Trimming whenever the queue emptied ran
# malloc_trim between most requests under load (a photo decodes quickly beside its inference), and each trim handed
# back pages that the next images faulted in again: 0.7 ms of system time a request at concurrency 32.
IDLE_TRIM_S = 0.2


def trim_memory():
    if _malloc_trim is not None:
        _malloc_trim(0)


class Decoder:
    def __init__(self, transform, p):
        self.transform, self.p = transform, p
        self.big = concurrent.futures.ThreadPoolExecutor(p.decode_threads, thread_name_prefix="decode")
        self.fast = concurrent.futures.ThreadPoolExecutor(p.decode_threads, thread_name_prefix="decode-fast")
        self.queued = 0                 # images admitted and not yet done, over all requests
        self.trim = None                # the timer that trims once the service has been idle IDLE_TRIM_S

    async def run(self, images):
        """[(name, bytes)] -> [(3, H, W) float32]; InputError (4xx, or 503 when the queue is full)."""
        if self.queued + len(images) > self.p.max_decode_queue:
            raise InputError(503, "busy", f"{self.queued} images are being decoded; the limit is "
                                          f"{self.p.max_decode_queue}: retry shortly")
        self.queued += len(images)
        if self.trim:
            self.trim.cancel()
        loop = asyncio.get_running_loop()
        try:
            if len(images) == 1:        # most requests: a photo's header and pixels in one job, one hop less
                first = await loop.run_in_executor(self.fast, self._open_and_decode, images[0])
                if isinstance(first, np.ndarray):
                    return [first]
                opened = [first]        # over fast_lane_pixels: it decodes in the big pool below
            else:
                opened = await loop.run_in_executor(self.fast, self._open_all, images)
            try:
                return await asyncio.gather(*(self._decode(loop, im, i, name)
                                              for i, ((name, _), im) in enumerate(zip(images, opened))))
            finally:
                for im in opened:       # those never decoded (cancelled, or a sibling failed)
                    im.close()
        finally:
            self.queued -= len(images)
            if self.queued == 0:        # when no image follows soon, give the burst's memory back (README, "Serving")
                self.trim = loop.call_later(IDLE_TRIM_S, self.fast.submit, trim_memory)

    def _open_all(self, images):
        opened, total = [], 0
        try:
            for i, (name, data) in enumerate(images):
                try:
                    im = open_image(data, self.p.max_pixels)
                except InputError as e:
                    raise where(e, i, name) from None
                opened.append(im)
                total += im.size[0] * im.size[1]
            if total > self.p.max_request_pixels:
                raise InputError(413, "request_too_large", f"the images hold {total:,} pixels together; the "
                                                           f"limit per request is {self.p.max_request_pixels:,}")
        except BaseException:
            for im in opened:
                im.close()
            raise
        return opened

    def _open_and_decode(self, image):
        """One image's array; the opened image instead when it is too big for the fast lane."""
        im, = self._open_all([image])
        return self._pixels(im, 0, image[0]) if self._pool(im) is self.fast else im

    async def _decode(self, loop, im, index, name):
        # cancelling the await cancels the pool's job if it has not started
        return await loop.run_in_executor(self._pool(im), self._pixels, im, index, name)

    def _pool(self, im):
        return self.fast if im.size[0] * im.size[1] <= self.p.fast_lane_pixels else self.big

    def _pixels(self, im, index, name):
        try:
            return decode(im, self.transform)
        except InputError as e:
            raise where(e, index, name) from None

    def shutdown(self):
        if self.trim:
            self.trim.cancel()
        for pool in (self.big, self.fast):
            pool.shutdown(cancel_futures=True)


def where(e, index, name):
    """The error with the image it is about in front of its detail."""
    return InputError(e.status, e.kind, f"image {index}" + (f" ({name!r})" if name else "") + f": {e.detail}")
