"""Grammar compilation off the step loop: a small thread pool compiles each distinct constraint
once (llguidance drops the GIL while it builds a lexer) and keeps its matcher template."""

from __future__ import annotations

import concurrent.futures
import threading

import llguidance

from jaxpaged.structured.backend import GuidanceBackend
from jaxpaged.structured.params import StructuredOutputsParams

# Templates kept (least recently used dropped first); a server sees a few schemas over and over.
MAX_CACHED_GRAMMARS = 256


class GrammarCache:
    """``submit(params)`` -> a future of the matcher template of ``params`` (cached by
    ``params.cache_key()``). Invalid constraints raise ValueError at ``submit``."""

    def __init__(self, backend: GuidanceBackend, max_workers: int = 2):
        self.backend = backend
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="jaxpaged-grammar")
        self._lock = threading.Lock()
        self._futures: dict[str, concurrent.futures.Future] = {}  # insertion order = age

    def submit(self, params: StructuredOutputsParams
               ) -> concurrent.futures.Future[llguidance.LLMatcher]:
        key = params.cache_key()
        with self._lock:
            future = self._futures.pop(key, None)
            if future is not None and not (future.done() and future.exception() is not None):
                self._futures[key] = future  # most recently used last
                return future
        grammar = self.backend.grammar(params)  # validates: raises at once for bad input
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._pool.submit(self.backend.compile, grammar)
                self._futures[key] = future
                while len(self._futures) > MAX_CACHED_GRAMMARS:
                    self._futures.pop(next(iter(self._futures)))
            return future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
