"""Strip an installed vLLM 0.24.0 tree down to what an offline dense-Llama run on Hopper loads.

    python bench/vllm_kit_strip.py SITE_DIR [--keep-fatbins]

Used by bench/vllm_kit.sh. Three steps, each checked against vLLM 0.24.0's source:

1. ``DROPPED`` paths go (each with the import path that makes it safe to drop).
2. The CUDA fat binaries in the remaining extensions keep only what an sm_90 GPU can load: per
   fatbin container, the sm_90/sm_90a cubins; where a container has none, its PTX of
   compute capability <= 9.0 (the driver compiles it for sm_90); where it has neither, its
   smallest entry, so that the container stays well formed (none of its kernels can run on Hopper
   in any case). The kept entries move to the container's start, its size field shrinks, and the
   freed bytes become zeros, so no offset in the library changes (the registration code points at
   container starts) and the zeros cost nothing once compressed.
3. ``strip --strip-unneeded`` drops the extensions' static symbol tables (the dynamic symbols that
   loading and torch's op registration use stay).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import struct
import subprocess
from dataclasses import dataclass

# (glob under SITE_DIR, why nothing on the benchmark's path loads it)
DROPPED: tuple[tuple[str, str], ...] = (
    ("vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so",
     "FA2: vllm_flash_attn/flash_attn_interface.py imports it in try/except; fa_utils.py picks "
     "FA3 on sm_90 (FA2 only for ALiBi)"),
    ("vllm/vllm_flash_attn/cute",
     "FA4 (CuTe DSL): FA4_AVAILABLE is False without it; only Blackwell or head_size > 256 use it"),
    ("vllm/_moe_C_stable_libtorch.abi3.so",
     "MoE ops: platforms/cuda.py import_kernels() imports it in try/except (a warning)"),
    ("vllm/_flashmla_C.abi3.so", "MLA: v1/attention/ops/flashmla.py, try/except"),
    ("vllm/_flashmla_extension_C.abi3.so", "MLA: v1/attention/ops/flashmla.py, try/except"),
    ("vllm/_qutlass_C.abi3.so", "NVFP4/MXFP4 (Blackwell): platforms/cuda.py, try/except"),
    ("vllm/third_party/deep_gemm",
     "fp8 block GEMMs: utils/import_utils.py has_deep_gemm() is then False"),
    ("vllm/third_party/fmha_sm100", "Blackwell attention sources"),
    ("vllm/vllm-rs", "Rust frontend: only with VLLM_USE_RUST_FRONTEND=1 (envs.py)"),
    ("vllm/_rust_tool_parser.abi3.so",
     "tool-call parsing (server): tool_parsers/rust_tool_parser.py imports it when called"),
    ("vllm/spinloop.abi3.so", "only with VLLM_USE_SPINLOOP_EXT=1 (shm_broadcast.py, try/except)"),
    ("vllm/entrypoints/serve/instrumentator/static", "the server's Swagger UI assets"),
    ("vllm/distributed/kv_transfer/*.jpg", "a diagram"),
    ("vllm/kernels/helion/configs", "Helion kernels' tuned configs (helion is not installed)"),
    ("vllm/model_executor/layers/fused_moe/configs", "MoE tuned configs (json)"),
    ("vllm/model_executor/layers/quantization/utils/configs",
     "fp8/int8 block-quantized GEMM configs (json)"),
    ("vllm/benchmarks", "`vllm bench` CLI only"),
    ("vllm-*.dist-info/RECORD", "lists the files before stripping"),
    ("bin", "console scripts of the dependencies"),
)

FATBIN_MAGIC = 0xBA55ED50
ELF_KIND, PTX_KIND = 2, 1
HOPPER = 90


@dataclass(frozen=True)
class FatbinEntry:
    """One image in a fatbin container: a cubin (ELF) or PTX for one compute capability."""

    kind: int
    arch: int
    start: int  # offset of the entry header in the file
    size: int  # header + payload, bytes

    def runs_on_hopper(self) -> bool:
        return self.kind == ELF_KIND and self.arch == HOPPER

    def compiles_for_hopper(self) -> bool:
        return self.kind == PTX_KIND and self.arch <= HOPPER


def section_span(path: pathlib.Path, name: str) -> tuple[int, int] | None:
    """(file offset, size) of an ELF section, read with readelf; None if absent."""
    listing = subprocess.run(["readelf", "-S", "-W", str(path)], check=True, text=True,
                             capture_output=True).stdout
    for line in listing.splitlines():
        if "]" in line and line.split("]", 1)[1].split()[:1] == [name]:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    return None


def container_entries(data: bytearray, start: int) -> tuple[int, int, list[FatbinEntry]]:
    """(header size, payload size, entries) of the fatbin container at `start`."""
    _, _, header_size, payload_size = struct.unpack_from("<IHHQ", data, start)
    entries, pos, end = [], start + header_size, start + header_size + payload_size
    while pos < end:
        kind, _, entry_header, entry_payload = struct.unpack_from("<HHIQ", data, pos)
        if entry_header == 0:
            raise ValueError(f"malformed fatbin entry at byte {pos}")
        arch = struct.unpack_from("<I", data, pos + 28)[0]
        entries.append(FatbinEntry(kind, arch, pos, entry_header + entry_payload))
        pos += entry_header + entry_payload
    return header_size, payload_size, entries


def entries_to_keep(entries: list[FatbinEntry]) -> list[FatbinEntry]:
    cubins = [e for e in entries if e.runs_on_hopper()]
    if cubins:
        return cubins
    ptx = [e for e in entries if e.compiles_for_hopper()]
    return ptx or [min(entries, key=lambda e: e.size)]


def prune_section(data: bytearray, start: int, end: int) -> tuple[int, int]:
    """Prunes every container in data[start:end] in place; returns (payload bytes before, kept)."""
    pos, before, kept = start, 0, 0
    while pos < end:
        if struct.unpack_from("<I", data, pos)[0] != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned; padding between them
            continue
        header_size, payload_size, entries = container_entries(data, pos)
        packed = b"".join(bytes(data[e.start:e.start + e.size]) for e in entries_to_keep(entries))
        body = pos + header_size
        data[body:body + payload_size] = packed + bytes(payload_size - len(packed))
        struct.pack_into("<Q", data, pos + 8, len(packed))
        before += payload_size
        kept += len(packed)
        pos = body + payload_size
    return before, kept


def prune_fatbins(path: pathlib.Path) -> tuple[int, int]:
    """Keeps the Hopper images of a library's fatbins; returns (payload bytes before, kept)."""
    span = section_span(path, ".nv_fatbin")
    if span is None:
        return 0, 0
    data = bytearray(path.read_bytes())
    before, kept = prune_section(data, span[0], span[0] + span[1])
    path.write_bytes(data)
    return before, kept


def drop_unused(site: pathlib.Path) -> list[str]:
    dropped = []
    for pattern, _reason in DROPPED:
        for path in sorted(site.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            dropped.append(str(path.relative_to(site)))
    return dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", type=pathlib.Path)
    parser.add_argument("--keep-fatbins", action="store_true",
                        help="leave the fat binaries whole (every GPU architecture; a larger kit)")
    args = parser.parse_args()
    for name in drop_unused(args.site):
        print(f"dropped {name}")
    for library in sorted(args.site.rglob("*.so")):
        before, kept = (0, 0) if args.keep_fatbins else prune_fatbins(library)
        if kept < before:
            print(f"fatbin {library.relative_to(args.site)}: {before / 1e6:.1f} MB -> "
                  f"{kept / 1e6:.1f} MB (the sm_90 images)")
        subprocess.run(["strip", "--strip-unneeded", str(library)], check=True)


if __name__ == "__main__":
    main()
