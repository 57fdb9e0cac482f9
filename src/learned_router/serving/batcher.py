"""Micro-batching: concurrent requests share one hand-off to a scoring thread, off the event loop (the int8 router
then scores them one onnxruntime call per prompt, so a score never depends on its batch; fp32 scores them together).

Scoring runs in `workers` threads (onnxruntime releases the GIL), one batch per thread at a time.
While every thread is busy, new prompts queue up and form the next batch, so an idle service adds no
wait and a busy one batches itself. `max_wait_s` optionally holds a batch open to gather more prompts.
A batch whose call fails is scored again one prompt at a time: only the prompts that fail alone get the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ScoreFn = Callable[[Sequence[str]], np.ndarray]


class ScoreBatcher:
    def __init__(
        self,
        score: ScoreFn,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.workers = workers
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="router-score")
        self._waiting = 0  # prompts handed to `score` whose scores have not come back

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="router-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            for t in self._batches:
                t.cancel()
            await asyncio.gather(self._task, *self._batches, return_exceptions=True)
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("the router is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def score(self, prompt: str) -> np.ndarray:
        """The router's outputs for one prompt (a vector, one value per output), scored with whatever else is waiting."""
        if self._queue is None or not self.running:
            raise RuntimeError("the score batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((prompt, fut))
        self._waiting += 1
        try:
            return await fut
        finally:
            self._waiting -= 1

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Stop once every prompt already handed to `score` has its scores (or after `timeout_s`): a router being
        replaced finishes the requests that reached it."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._waiting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        await self.stop()

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        free = asyncio.Semaphore(self.workers)
        while True:
            batch = [await queue.get()]
            await free.acquire()  # while every worker is busy, the queue grows into the next batch
            if self.max_wait_s > 0 and queue.qsize() < self.max_batch - 1:
                await asyncio.sleep(self.max_wait_s)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(p, f) for p, f in batch if not f.done()]  # drop requests cancelled while waiting
            if not batch:
                free.release()
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            task = asyncio.create_task(self._score_batch(batch))
            self._batches.add(task)
            task.add_done_callback(lambda t: (self._batches.discard(t), free.release()))

    async def _score_batch(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        """Score the batch in one call; when that call fails, each prompt alone, so a bad prompt fails by itself."""
        loop = asyncio.get_running_loop()
        try:
            try:
                scores = await loop.run_in_executor(self._executor, self._score_all, [p for p, _ in batch])
            except Exception:
                if len(batch) == 1:
                    raise
                scores = None
            if scores is None:
                for prompt, fut in batch:
                    if fut.done():
                        continue
                    try:
                        fut.set_result((await loop.run_in_executor(self._executor, self._score_all, [prompt]))[0])
                    except Exception as e:
                        if not fut.done():
                            fut.set_exception(e)
                return
        except BaseException as e:  # every request still waiting gets the scorer's error
            err = RuntimeError("the router is shutting down") if isinstance(e, asyncio.CancelledError) else e
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        for (_, fut), s in zip(batch, scores, strict=True):
            if not fut.done():
                fut.set_result(s)

    def _score_all(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self._score(prompts), dtype=np.float64).reshape(len(prompts), -1)  # binary routers give (n,)
