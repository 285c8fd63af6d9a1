"""Host-heavy work of the HTTP side off the event loop: tokenizing prompts, rendering chat
templates, decoding token ids for /detokenize and echo.

A 10 MB prompt tokenized on the event loop froze every request, /health included, for as long
as it took. Here each piece of work runs on a small thread pool, and every worker thread has its
own tokenizer (Hugging Face tokenizers are not safe to share between threads: "Already
borrowed"), so the event loop keeps answering while they run. The event loop keeps its own
tokenizer for the cheap per-token texts of responses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_UNSET = object()

DEFAULT_WORKERS = 2


class HostWorkPool:
    def __init__(self, load_tokenizer: Callable[[], Any], workers: int = DEFAULT_WORKERS):
        """``load_tokenizer``: makes one worker's tokenizer (None for a server without one)."""
        self._load = load_tokenizer
        self._local = threading.local()  # this pool's per-worker tokenizers
        self._executor = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="jaxpaged-tokenize")

    def _tokenizer(self) -> Any:
        tokenizer = getattr(self._local, "tokenizer", _UNSET)
        if tokenizer is _UNSET:
            tokenizer = self._local.tokenizer = self._load()
        return tokenizer

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(tokenizer, *args)`` on a worker thread, with that worker's tokenizer."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          lambda: work(self._tokenizer(), *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
