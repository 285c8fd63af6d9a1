"""What every handler needs: the engine thread, the HTTP side's tokenizer, names and limits."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from starlette.requests import Request

from jaxpaged.engine.tokenizer import TokenTexts
from jaxpaged.server.engine_client import EngineClient
from jaxpaged.server.errors import bad_request
from jaxpaged.server.generation_defaults import GenerationDefaults
from jaxpaged.server.host_work import HostWorkPool
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.settings import ServerSettings

if TYPE_CHECKING:  # transformers loads only when a tokenizer does
    from transformers import PreTrainedTokenizerBase


@dataclasses.dataclass(frozen=True)
class ServerContext:
    settings: ServerSettings
    engine: EngineClient  # AsyncEngine in-process, or ReplicaEngine (Ray replicas)
    # The HTTP side's own tokenizer (chat templates, prompts, logprob token texts): the engine
    # thread keeps using the engine's, so the two threads never share a tokenizer object.
    tokenizer: PreTrainedTokenizerBase | None
    token_texts: TokenTexts
    metrics: ServerMetrics | None  # the in-process engine's; replicas keep their own
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    max_logprobs: int
    scheduling_policy: str  # "fcfs" or "priority": a request's priority needs the latter
    generation_defaults: GenerationDefaults  # for the fields a request omits
    host_work: HostWorkPool  # tokenization and chat templates, off the event loop
    max_prompt_chars: int  # longer texts cannot fit max_model_len: refused before tokenizing
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))  # model cards

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def with_tokenizer(self, tokenizer: PreTrainedTokenizerBase | None) -> ServerContext:
        """This context with a worker thread's own tokenizer (``HostWorkPool.run``)."""
        return dataclasses.replace(self, tokenizer=tokenizer)

    def check_model(self, name: str | None) -> None:
        """400 unless ``name`` is None or one of the served names."""
        if name is not None and name not in self.settings.served_model_names:
            raise bad_request(f"the model {name!r} does not exist; this server serves "
                              f"{list(self.settings.served_model_names)}", "model",
                              "model_not_found")


def context_of(request: Request) -> ServerContext:
    return request.app.state.context
