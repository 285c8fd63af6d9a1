"""Engine arguments with vLLM's names, defaults and validation."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

logger = logging.getLogger(__name__)

# vLLM arguments that change nothing in jaxpaged when left at these values (accepted so vLLM code
# runs unchanged); any other value is refused rather than silently ignored.
_NO_OP_VLLM_ARGS: dict[str, tuple[Any, ...]] = {
    "trust_remote_code": (False, True),  # jaxpaged never runs code from a checkpoint
    "tokenizer_mode": ("auto",),
    "revision": (None,),
    "tokenizer_revision": (None,),
    "enforce_eager": (False, True),  # no eager mode: every step is a compiled XLA program
    "swap_space": (None, 0, 4),
    "disable_log_stats": (False, True),
    "disable_custom_all_reduce": (False, True),
    "max_seq_len_to_capture": (None, 8192),
    "pipeline_parallel_size": (1,),  # one model per host (_REFUSAL_REASONS)
    "data_parallel_size": (1,),  # replicas are the server's (jaxpaged.distributed)
    "hf_token": (None,),
    "task": ("auto", "generate"),
}

# Why a vLLM argument is refused at any other value, where the bare refusal would not say.
_REFUSAL_REASONS: dict[str, str] = {
    "pipeline_parallel_size": "pipeline parallel stages are not built; "
                              "tensor_parallel_size shards one model over this host's devices",
    "data_parallel_size": "one LLM is one engine: data parallel replicas run on Ray, as "
                          "`jaxpaged serve --data-parallel-size N` or one LLM per Ray actor",
}


# kv_cache_dtype -> the pool's dtype name (None: the model's dtype).
KV_CACHE_DTYPES: dict[str, str | None] = {
    "auto": None, "bfloat16": "bfloat16", "float32": "float32",
    "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


# quantization -> (vLLM's names; "int8" is jaxpaged's weight-only int8). None: the checkpoint's.
QUANTIZATION_METHODS = (None, "fp8", "int8", "compressed-tensors")
QUANT_MATMUL_KERNELS = ("auto", "dequant_xla", "w8a16_gemv", "w8a16_pallas", "w8a8_pallas",
                        "w8a8_xla")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str
    """Model directory: a Hugging Face checkpoint or one made by ``jaxpaged convert``."""
    load_format: Literal["auto", "dummy"] = "auto"
    """"auto": the checkpoint's weights; "dummy": random weights of config.json's shapes, made on
    the device (benchmarks; the directory needs only config.json)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``model``."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer: prompts must be token ids and outputs carry no text."""
    dtype: Literal["auto", "bfloat16", "bf16", "float32", "fp32", "half", "float16"] = "auto"
    """Weights and activations; "auto" takes the checkpoint's (fp16/bf16 -> bf16, fp32 -> fp32).
    "half"/"float16" run as bfloat16 with a warning: the model has no fp16 path, and bf16 takes
    the same memory with fp32's range (vLLM launch lines ask for half on GPUs without bf16)."""
    kv_cache_dtype: Literal["auto", "bfloat16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    """KV cache dtype (vLLM's names); "auto" = the model dtype. "fp8" (= "fp8_e4m3") and
    "fp8_e5m2" store K and V in one byte each with a per-layer scale (twice the tokens in the
    pool, half the bytes read by attention)."""
    quantization: Literal[None, "fp8", "int8", "compressed-tensors"] = None
    """Weight quantization of the projections (vLLM's name). None: the checkpoint's (a
    pre-quantized HF "fp8" or compressed-tensors FP8 checkpoint, or one made by ``jaxpaged
    convert --quantization``), else unquantized. "fp8": E4M3 weights with per-output-channel
    scales; "int8": int8 weights with per-output-channel scales, bf16 activations (W8A16).
    Embeddings, norms and lm_head stay in the model dtype; weights take about half the bytes, and
    the KV pool gets what they save."""
    quant_matmul_kernel: Literal["auto", "dequant_xla", "w8a16_pallas", "w8a8_pallas",
                                 "w8a8_xla"] = "auto"
    """Quantized models: the matmul kernel of every projection ("auto": by the step's token
    count, ``pallas_kernels.quant_matmul.KERNEL_BY_TOKENS``). For benchmarks."""
    calculate_kv_scales: bool = False
    """fp8 KV cache: estimate each layer's K and V scales at start-up from a calibration forward
    pass (vLLM's flag and rule: amax / 200 for K, amax / 100 for V). Otherwise the
    checkpoint's scales are used where it carries them (``k_scale`` / ``v_scale`` or
    ``k_proj.output_scale`` / ``v_proj.output_scale``), else 1.0."""
    max_model_len: int | None = None
    """Context length (prompt + output); defaults to the model's max_position_embeddings, lowered
    (with a warning) to what the KV cache holds when one such sequence would not fit."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the accelerator memory jaxpaged may use; the KV pool gets what is left."""
    kv_cache_memory_bytes: int | None = None
    """Exact KV pool size in bytes, per device (overrides gpu_memory_utilization). The default
    on the CPU (per device):
    what max_num_seqs sequences of max_model_len need, between 256 MiB and 1 GiB."""
    num_gpu_blocks_override: int | None = None
    """Exact number of KV blocks (testing and benchmarks)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int | None = None
    """Most sequences in one step; defaults to 256 on a GPU, 16 on the CPU."""
    max_num_batched_tokens: int | None = None
    """Token budget of one step; defaults to 8192 on a GPU, 512 on the CPU (at least
    max_num_seqs, and max_model_len when chunked prefill is off)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of identical prompt prefixes."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps and mix them with decodes."""
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """Order of admission."""
    max_waiting: int | None = None
    """Most requests in the waiting queue (None: unbounded); beyond it ``add_request`` raises
    ``QueueFullError`` (the server answers 503)."""
    seed: int = 0
    """Seed of the engine's random stream (requests with their own seed ignore it)."""
    max_logprobs: int = 20
    """Largest ``logprobs`` / ``prompt_logprobs`` a request may ask for; -1: no cap (a request
    may then ask for the whole vocabulary with -1, as in vLLM)."""
    tensor_parallel_size: int = 1
    """Devices of this host to shard the model over (the first N local devices: those
    CUDA_VISIBLE_DEVICES shows). Heads and MLP columns are split (``models.tensor_parallel``);
    num_attention_heads must divide by it, and num_key_value_heads divide it or by it."""
    attention_impl: Literal["auto", "pallas", "xla", "reference"] = "auto"
    """Attention: "auto" runs the Pallas kernels on a CUDA GPU and the XLA path ("xla": loops
    over the pages a step uses) elsewhere; "reference" is the dense jnp reference (tests)."""
    async_scheduling: bool = True
    """Overlap the host with the device (vLLM's name): each step's sampled ids feed the next step
    on the device and reach the host one step late, so scheduling and detokenizing run while the
    device computes. Outputs are the same; a request may run one extra (discarded) step. On by
    default (vLLM's is off): measured faster for nano and for a batch-1 decode step
    (bench/RESULTS.md)."""
    generation_config: str = "auto"
    """Where default sampling parameters come from (vLLM's name): "auto" the model's
    ``generation_config.json``, "vllm" none (vLLM's neutral defaults), or a directory holding a
    ``generation_config.json`` (its EOS ids are read too). See ``engine.generation_defaults``."""
    override_generation_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Sampling defaults laid over the generation config, e.g. ``{"temperature": 0.5}`` (keys:
    repetition_penalty, temperature, top_k, top_p, min_p, max_new_tokens)."""
    compile_step_shapes: Literal["auto", "start", "first_use"] = "auto"
    """When the step programs compile. "start": every step shape (and the common samplers) at
    start-up, so no step ever waits for the compiler. "first_use": each when a step first needs
    it: start-up takes seconds, and the first step of each new shape waits for its compile.
    "auto": "start" on a GPU, "first_use" on the CPU (where compiling every shape of a real
    model takes minutes on a small machine)."""
    compilation_cache_dir: str | None = "~/.cache/jaxpaged/xla"
    """JAX's persistent compilation cache (makes the second start fast), with jaxpaged's compiled
    step programs beside it (``jaxpaged-executables/``: a warm start loads them without tracing);
    None disables both. Ignored when the process already set ``jax_compilation_cache_dir``."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be a non-negative integer or -1, "
                             f"got {self.max_logprobs!r}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "num_gpu_blocks_override", "kv_cache_memory_bytes", "max_waiting"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        self._verify_dtypes()
        if self.compile_step_shapes not in ("auto", "start", "first_use"):
            raise ValueError(f"compile_step_shapes must be 'auto', 'start' or 'first_use', "
                             f"got {self.compile_step_shapes!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory, "
                             f"got {self.generation_config!r}")
        if not isinstance(self.override_generation_config, dict):
            raise ValueError(f"override_generation_config must be a dict, "
                             f"got {self.override_generation_config!r}")

    def _verify_dtypes(self) -> None:
        if self.dtype in ("half", "float16"):
            logger.warning("dtype=%r runs as bfloat16: jaxpaged has no float16 model path "
                           "(bfloat16 takes the same memory)", self.dtype)
            object.__setattr__(self, "dtype", "bfloat16")
        if self.dtype not in ("auto", "bfloat16", "bf16", "float32", "fp32"):
            raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float32' or 'half', "
                             f"got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, "
                             f"got {self.quantization!r}")
        if self.quant_matmul_kernel not in QUANT_MATMUL_KERNELS:
            raise ValueError(f"quant_matmul_kernel must be one of {QUANT_MATMUL_KERNELS}, "
                             f"got {self.quant_matmul_kernel!r}")
        if self.calculate_kv_scales and not self.kv_cache_dtype.startswith("fp8"):
            raise ValueError("calculate_kv_scales=True needs an fp8 kv_cache_dtype, got "
                             f"{self.kv_cache_dtype!r}")

    @classmethod
    def from_kwargs(cls, model: str, kwargs: dict[str, Any]) -> "EngineConfig":
        """``LLM(model, **kwargs)``: fields by name; unknown names are a TypeError, like vLLM."""
        fields = {f.name for f in dataclasses.fields(cls)}
        chosen = {}
        for name, value in kwargs.items():
            if name in fields:
                chosen[name] = value
            elif name in _NO_OP_VLLM_ARGS:
                if value not in _NO_OP_VLLM_ARGS[name]:
                    shown = "<redacted>" if name == "hf_token" else repr(value)  # a secret
                    reason = f" ({_REFUSAL_REASONS[name]})" if name in _REFUSAL_REASONS else ""
                    raise ValueError(f"{name}={shown} is not supported by jaxpaged{reason}")
            else:
                raise TypeError(f"unexpected keyword argument {name!r}")
        return cls(model=model, **chosen)
