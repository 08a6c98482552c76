"""Streaming safetensors checkpoint -> GGUF converter for checkpoints of any size.

Tensors are read slice by slice through short-lived memory maps of the checkpoint file(s),
converted (F32/F16/BF16 -> F32, F16 or Q8_0) and written straight to the output, so peak memory
is a few slices whatever the size of the model or of its largest tensor. The GGUF header,
metadata and tensor table are written by ``gguf.GGUFWriter`` (tensor infos first, data after);
the data section is then streamed in the order and alignment that table promised. With a
keyring the output goes through the chunked seal (format 2) as it is written: no plaintext
GGUF byte reaches the disk and the artifact is never held whole in memory.

Tensor names are kept as the checkpoint has them (no llama.cpp name mapping), and 1-D tensors
(norms, biases) stay F32, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
)
from gguf.gguf_writer import WriterState
from gguf.quants import quantize

from forseti.core.durable import atomic_output
from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, SealingWriter

log = logging.getLogger(__name__)

# Elements per slice: 4 Mi elements is 8 MiB of BF16 input and 16 MiB as float32, large
# enough that per-slice Python overhead is negligible. A multiple of every block size used.
DEFAULT_SLICE_ELEMENTS = 4 << 20
# safetensors itself refuses headers above 100 MB; so do we, before parsing any JSON.
MAX_HEADER_BYTES = 100_000_000
# ggml's GGML_MAX_NAME is 64 bytes including the terminating NUL.
GGML_MAX_NAME = 63
# general.architecture when the caller names none.
DEFAULT_ARCH = "forseti"

# safetensors dtype -> (numpy dtype the bytes are read as, bytes per element)
_SOURCE_DTYPES: dict[str, tuple[type[np.generic], int]] = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),  # numpy has no bfloat16: read the bits, widen to float32 by hand
}

OUT_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
}

_FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}


class ConvertError(Exception):
    """The checkpoint cannot be converted; the message says which file/tensor and why."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the first byte in ``file``
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A source tensor and the GGUF type it will be written as."""

    source: SourceTensor
    qtype: GGMLQuantizationType

    @property
    def out_nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.source.n_elements // block * type_size


@dataclass
class ConvertResult:
    """What a conversion wrote, and how fast."""

    output: Path
    sealed: bool
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    types: dict[str, int] = field(default_factory=dict)

    @property
    def read_mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")


class _Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> int: ...
    def tell(self) -> int: ...
    def flush(self) -> None: ...


def read_safetensors_header(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Parse and check one safetensors file's header; tensors come back in file order."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ConvertError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ConvertError(
                    f"{path}: header length {header_len} is impossible for a {size}-byte file; "
                    "is this a safetensors file?"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise ConvertError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConvertError(f"{path}: __metadata__ is not an object")
    tensors: list[SourceTensor] = []
    for name, entry in header.items():
        tensors.append(_source_tensor(path, name, entry, data_start, data_len))
    tensors.sort(key=lambda t: t.offset)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _source_tensor(
    path: Path, name: str, entry: object, data_start: int, data_len: int
) -> SourceTensor:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ConvertError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _SOURCE_DTYPES:
        raise ConvertError(
            f"{where}: dtype {dtype!r} is not convertible; supported: {', '.join(_SOURCE_DTYPES)}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ConvertError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise ConvertError(f"{where}: data_offsets {offsets!r} fall outside the file")
    itemsize = _SOURCE_DTYPES[dtype][1]
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * itemsize:
        raise ConvertError(
            f"{where}: {nbytes} bytes do not hold shape {shape} of {dtype}; the file is damaged"
        )
    return SourceTensor(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)


def list_checkpoint(checkpoint: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Tensors of a ``.safetensors`` file, or of every ``*.safetensors`` shard in a folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"{checkpoint}: folder holds no *.safetensors files")
    elif checkpoint.is_file():
        files = [checkpoint]
    else:
        raise ConvertError(f"checkpoint {checkpoint} does not exist")
    tensors: list[SourceTensor] = []
    metadata: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for path in files:
        file_tensors, file_metadata = read_safetensors_header(path)
        for t in file_tensors:
            if t.name in seen:
                raise ConvertError(f"tensor {t.name!r} is in both {seen[t.name]} and {path}")
            seen[t.name] = path
        tensors += file_tensors
        metadata.update(file_metadata)
    if not tensors:
        raise ConvertError(f"{checkpoint}: no tensors to convert")
    return tensors, metadata


def plan_type(tensor: SourceTensor, outtype: str) -> GGMLQuantizationType:
    """The GGUF type a tensor is written as for the requested ``outtype``."""
    target = OUT_TYPES[outtype]
    if len(tensor.shape) <= 1:
        return GGMLQuantizationType.F32
    if target == GGMLQuantizationType.Q8_0:
        block = GGML_QUANT_SIZES[target][0]
        if tensor.shape[-1] % block != 0:
            # Q8_0 blocks run along rows; a row that does not split into blocks stays F16.
            return GGMLQuantizationType.F16
    return target


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: shift the bits back into place.
        wide = raw.astype(np.uint32)
        wide <<= 16  # in place: one float32-sized buffer per slice, not two
        return wide.view(np.float32)
    return raw.astype(np.float32, copy=False)


def _quant_row_width(count: int) -> int:
    """A row width for ``gguf.quants.quantize`` that divides ``count``.

    Q8_0 blocks are independent, so the bytes do not depend on how the slice is shaped, but
    quantize works on groups of 16 rows: rows of one 32-element block make it ~25x slower.
    """
    block = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    width = 16384
    while width > block and count % width:
        width //= 2
    return width


@dataclass(frozen=True)
class _SliceJob:
    planned: PlannedTensor
    start: int  # first element
    count: int
    last: bool  # the tensor's last slice

    @property
    def in_bytes(self) -> int:
        return self.count * _SOURCE_DTYPES[self.planned.source.dtype][1]


def _slice_jobs(plan: list[PlannedTensor], slice_elements: int) -> Iterator[_SliceJob]:
    for p in plan:
        total = p.source.n_elements
        if total == 0:
            yield _SliceJob(p, 0, 0, True)
        for start in range(0, total, slice_elements):
            count = min(slice_elements, total - start)
            yield _SliceJob(p, start, count, start + count == total)


def _convert_slice(job: _SliceJob) -> np.ndarray:
    """Map one slice of the checkpoint, convert it; the map is released with the result."""
    src, qtype = job.planned.source, job.planned.qtype
    if job.count == 0:
        return np.empty(0, dtype=np.uint8)
    np_dtype, itemsize = _SOURCE_DTYPES[src.dtype]
    raw = np.memmap(
        src.file,
        dtype=np_dtype,
        mode="r",
        offset=src.offset + job.start * itemsize,
        shape=(job.count,),
    )
    if (src.dtype, qtype) in (("F32", GGMLQuantizationType.F32), ("F16", GGMLQuantizationType.F16)):
        return raw  # written straight from the map
    values = _as_float32(raw, src.dtype)
    if qtype == GGMLQuantizationType.Q8_0:
        values = values.reshape(-1, _quant_row_width(job.count))
    return quantize(values, qtype)


def pad_to(sink: _Sink, alignment: int) -> None:
    """Zero bytes up to the next multiple of ``alignment`` (GGUF's tensor data alignment)."""
    pad = GGUFWriter.ggml_pad(sink.tell(), alignment) - sink.tell()
    if pad:
        sink.write(b"\0" * pad)


def write_gguf_head(writer: GGUFWriter, sink: _Sink) -> int:
    """Write ``writer``'s header, metadata and tensor table into ``sink``, padded to where the
    tensor data starts; returns the data alignment. The caller then writes each tensor's bytes,
    padded to that alignment, in the order of the table.

    GGUFWriter's own path buffers every tensor in memory and its data writer needs a real file;
    a policy written to bytes and a converter that streams (maybe through a sealing writer)
    need neither, so only its header writers are used.
    """
    writer.fout = [sink]  # type: ignore[list-item]
    writer.state = WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    alignment = writer.data_alignment
    pad_to(sink, alignment)
    return alignment


def _write_gguf(
    sink: _Sink,
    plan: list[PlannedTensor],
    *,
    arch: str,
    name: str,
    outtype: str,
    metadata: dict[str, str],
    slice_elements: int,
    threads: int,
    advance: Callable[[int], None],
) -> None:
    writer = GGUFWriter(path=None, arch=arch)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in sorted(metadata.items()):
        writer.add_string(f"safetensors.metadata.{key}", value)
    for p in plan:
        # A float dtype with raw_dtype set means "shape is the logical shape" to GGUFWriter.
        writer.add_tensor_info(
            p.source.name, p.source.shape or (1,), np.dtype(np.float32), p.out_nbytes, p.qtype
        )
    # The sink is a plain atomic file or a sealing stream.
    alignment = write_gguf_head(writer, sink)
    tensor_start = sink.tell()
    # Slices convert on worker threads (numpy releases the GIL) and are written in order; at
    # most `threads` slices are in flight, so memory stays bounded by the slice size.
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gguf-convert")
    try:
        jobs = _slice_jobs(plan, slice_elements)
        pending: deque[tuple[_SliceJob, Future[np.ndarray]]] = deque(
            (job, pool.submit(_convert_slice, job)) for job in itertools.islice(jobs, threads)
        )
        while pending:
            job, future = pending.popleft()
            out = future.result()
            sink.write(np.ascontiguousarray(out).data.cast("B"))
            del out, future  # drop the slice (and its map) before more are made
            following = next(jobs, None)
            if following is not None:
                pending.append((following, pool.submit(_convert_slice, following)))
            advance(job.in_bytes)
            if job.last:
                written = sink.tell() - tensor_start
                if written != job.planned.out_nbytes:  # the tensor table promised this size
                    raise ConvertError(
                        f"tensor {job.planned.source.name!r}: wrote {written}, "
                        f"expected {job.planned.out_nbytes}"
                    )
                pad_to(sink, alignment)
                tensor_start = sink.tell()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    sink.flush()


def _progress_bar(total: int, enabled: bool | None) -> Callable[[int], None] | None:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="gguf", leave=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def convert_checkpoint(
    checkpoint: Path,
    output: Path,
    *,
    outtype: str = "f16",
    arch: str = DEFAULT_ARCH,
    name: str | None = None,
    keyring: Keyring | None = None,
    model: str | None = None,
    version: int | None = None,
    progress: bool | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    slice_elements: int = DEFAULT_SLICE_ELEMENTS,
    threads: int | None = None,
) -> ConvertResult:
    """Convert a safetensors checkpoint (file or folder of shards) to GGUF at ``output``.

    ``outtype``: f32, f16 or q8_0 for tensors of two or more dimensions (1-D ones stay F32;
    rows that do not split into Q8_0 blocks fall back to F16). ``arch`` becomes
    ``general.architecture``. With ``keyring`` (and ``model``/``version`` for the binding) the
    output is sealed while it is written, to ``<output>.sealed``. ``progress``: a tqdm bar
    with MB/s (None: only on a terminal); ``on_progress(bytes_read, total)`` after each slice.
    ``threads`` slices convert at once (default: the CPU count, at most 4); peak memory is
    about ``threads + 1`` slices.
    The output appears atomically, complete or not at all.
    """
    if outtype not in OUT_TYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUT_TYPES)}")
    if slice_elements <= 0 or slice_elements % 256:
        raise ConvertError(
            f"slice_elements must be a positive multiple of 256, got {slice_elements}"
        )
    output = Path(output)
    if output.name.endswith(SEALED_SUFFIX):
        output = output.with_name(output.name[: -len(SEALED_SUFFIX)])
    if keyring is not None and (model is None or version is None):
        raise ConvertError("sealing needs the model name and version the artifact is bound to")
    if not output.parent.is_dir():
        raise ConvertError(f"output folder {output.parent} does not exist; create it first")
    tensors, metadata = list_checkpoint(Path(checkpoint))
    for t in tensors:
        if len(t.name.encode("utf-8")) > GGML_MAX_NAME:
            log.warning(
                "tensor name longer than ggml allows name=%s limit=%d", t.name, GGML_MAX_NAME
            )
    plan = [PlannedTensor(t, plan_type(t, outtype)) for t in tensors]
    total_in = sum(t.nbytes for t in tensors)
    bar = _progress_bar(total_in, progress)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if bar is not None:
            bar(n)
        if on_progress is not None:
            on_progress(done, total_in)

    kwargs = {
        "arch": arch,
        "name": name or Path(checkpoint).stem,
        "outtype": outtype,
        "metadata": metadata,
        "slice_elements": slice_elements,
        "threads": threads or min(4, os.cpu_count() or 1),
        "advance": advance,
    }
    started = time.perf_counter()
    final_path = output.with_name(output.name + SEALED_SUFFIX) if keyring else output
    with atomic_output(final_path, mode=0o644) as fh:
        if keyring is not None:
            assert model is not None and version is not None
            with SealingWriter(
                fh, keyring, model=model, version=version, filename=output.name
            ) as sealer:
                _write_gguf(sealer, plan, **kwargs)  # type: ignore[arg-type]
                plain_bytes = sealer.tell()
        else:
            _write_gguf(_FileSink(fh), plan, **kwargs)  # type: ignore[arg-type]
            plain_bytes = fh.tell()
    seconds = time.perf_counter() - started
    types: dict[str, int] = {}
    for p in plan:
        types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    result = ConvertResult(
        output=final_path,
        sealed=keyring is not None,
        tensors=len(plan),
        bytes_read=total_in,
        bytes_written=plain_bytes,
        seconds=seconds,
        types=types,
    )
    log.info(
        "gguf written output=%s tensors=%d read_mb=%.1f written_mb=%.1f seconds=%.2f "
        "mb_per_s=%.1f sealed=%s types=%s",
        final_path,
        result.tensors,
        total_in / 1e6,
        plain_bytes / 1e6,
        seconds,
        result.read_mb_per_s,
        result.sealed,
        types,
    )
    return result


class _FileSink:
    """A buffered file as a sink; ``tell`` without a syscall per call."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._position = fh.tell()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self._fh.write(data)
        self._position += n
        return n

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._fh.flush()
