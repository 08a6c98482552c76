"""Streaming safetensors -> GGUF converter: every tensor read back with gguf.GGUFReader,
Q8_0 within the format's error bound, sealed output, and memory that does not grow with size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from forseti.core.sealing.keyring import Keyring
from forseti.core.sealing.sealed import SEALED_SUFFIX, open_sealed_stream
from forseti.exporters.gguf_stream import (
    ConvertError,
    convert_checkpoint,
    list_checkpoint,
)

F16 = GGMLQuantizationType.F16
F32 = GGMLQuantizationType.F32
Q8_0 = GGMLQuantizationType.Q8_0


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (what torch's .bfloat16() does)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def save_checkpoint(
    path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> None:
    """Write with safetensors' own serializer; BF16 tensors are given as uint16 bit patterns."""
    arrays = {name: np.ascontiguousarray(a) for name, (_, a) in tensors.items()}
    specs = {
        name: safetensors.TensorSpec(
            dtype=dtype,
            shape=list(arrays[name].shape),
            data_ptr=arrays[name].ctypes.data,
            data_len=arrays[name].nbytes,
        )
        for name, (dtype, _) in tensors.items()
    }
    safetensors.serialize_file(specs, str(path), metadata=metadata)


def read_back(path: Path) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """Every tensor of a GGUF file, dequantised to float32 in numpy shape order."""
    reader = GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type, values.astype(np.float32))
    return out


rng = np.random.default_rng(7)
W_F32 = rng.standard_normal((64, 96)).astype(np.float32) * 3
W_F16 = rng.standard_normal((40, 64)).astype(np.float16)
W_BF16_BITS = to_bf16_bits(rng.standard_normal((8, 128, 32)).astype(np.float32) * 0.02)
ODD_ROWS = rng.standard_normal((16, 33)).astype(np.float32)  # 33: not a Q8_0 block multiple
NORM = rng.standard_normal(96).astype(np.float32)
BIAS_BF16_BITS = to_bf16_bits(rng.standard_normal(40).astype(np.float32))

SOURCE = {
    "blk.0.w": ("float32", W_F32),
    "blk.0.v": ("float16", W_F16),
    "blk.1.w": ("bfloat16", W_BF16_BITS),
    "odd": ("float32", ODD_ROWS),
    "norm": ("float32", NORM),
    "bias": ("bfloat16", BIAS_BF16_BITS),
}
# The exact float32 values each source tensor holds.
EXACT = {
    "blk.0.w": W_F32,
    "blk.0.v": W_F16.astype(np.float32),
    "blk.1.w": bf16_to_f32(W_BF16_BITS),
    "odd": ODD_ROWS,
    "norm": NORM,
    "bias": bf16_to_f32(BIAS_BF16_BITS),
}


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, SOURCE, metadata={"format": "pt", "note": "test"})
    return path


def test_f16_output_reproduces_every_tensor_to_fp16_rounding(
    checkpoint: Path, tmp_path: Path
) -> None:
    result = convert_checkpoint(checkpoint, tmp_path / "out.gguf", outtype="f16")
    back = read_back(result.output)

    assert set(back) == set(EXACT)
    for name, exact in EXACT.items():
        qtype, values = back[name]
        assert values.shape == exact.shape, name
        if exact.ndim == 1:
            assert qtype == F32 and np.array_equal(values, exact), name
        else:
            assert qtype == F16, name
            assert np.array_equal(values, exact.astype(np.float16).astype(np.float32)), name


def test_q8_0_error_is_within_the_format_bound_per_block(checkpoint: Path, tmp_path: Path) -> None:
    back = read_back(convert_checkpoint(checkpoint, tmp_path / "q.gguf", outtype="q8_0").output)

    for name in ("blk.0.w", "blk.0.v", "blk.1.w"):
        qtype, values = back[name]
        assert qtype == Q8_0, name
        blocks = EXACT[name].reshape(-1, 32).astype(np.float64)
        err = np.abs(values.reshape(-1, 32) - blocks)
        # d = amax/127 rounds to the nearest step (d/2); d itself is stored as fp16, which can
        # move a value by up to 127 * |fp16(d) - d|.
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        d16 = d.astype(np.float16).astype(np.float64)
        bound = d / 2 + 127 * np.abs(d16 - d) + 1e-6 * d
        assert (err <= bound).all(), f"{name}: worst excess {(err - bound).max()}"
        assert err.max() > 0, f"{name}: no quantisation error at all is implausible"


def test_q8_0_keeps_vectors_f32_and_odd_rows_f16(checkpoint: Path, tmp_path: Path) -> None:
    back = read_back(convert_checkpoint(checkpoint, tmp_path / "q.gguf", outtype="q8_0").output)

    assert back["norm"][0] == F32 and np.array_equal(back["norm"][1], NORM)
    assert back["bias"][0] == F32 and np.array_equal(back["bias"][1], EXACT["bias"])
    assert back["odd"][0] == F16
    assert np.array_equal(back["odd"][1], ODD_ROWS.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_output_bytes_do_not_depend_on_the_slice_size(
    checkpoint: Path, tmp_path: Path, outtype: str
) -> None:
    whole = convert_checkpoint(checkpoint, tmp_path / "a.gguf", outtype=outtype)
    sliced = convert_checkpoint(
        checkpoint, tmp_path / "b.gguf", outtype=outtype, slice_elements=256
    )

    assert whole.output.read_bytes() == sliced.output.read_bytes()


def test_metadata_and_architecture_are_written(checkpoint: Path, tmp_path: Path) -> None:
    out = convert_checkpoint(checkpoint, tmp_path / "m.gguf", arch="llama", name="tiny").output
    fields = GGUFReader(out).fields

    def text(key: str) -> str:
        f = fields[key]
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    assert text("general.architecture") == "llama"
    assert text("general.name") == "tiny"
    assert text("safetensors.metadata.note") == "test"


def test_sealed_output_has_no_plaintext_file_and_opens_to_the_same_bytes(
    checkpoint: Path, tmp_path: Path, keyring: Keyring
) -> None:
    plain = convert_checkpoint(checkpoint, tmp_path / "model.gguf", outtype="q8_0")
    target = tmp_path / "repo" / "llm" / "3"
    target.mkdir(parents=True)

    sealed = convert_checkpoint(
        checkpoint,
        target / "model.gguf",
        outtype="q8_0",
        keyring=keyring,
        model="llm",
        version=3,
    )

    assert sealed.sealed and sealed.output == target / ("model.gguf" + SEALED_SUFFIX)
    assert [p.name for p in target.iterdir()] == ["model.gguf" + SEALED_SUFFIX]
    with open(sealed.output, "rb") as fh:
        opened = b"".join(
            open_sealed_stream(fh, keyring, model="llm", version=3, filename="model.gguf")
        )
    assert opened == plain.output.read_bytes()


def test_sealing_needs_model_and_version(
    checkpoint: Path, tmp_path: Path, keyring: Keyring
) -> None:
    with pytest.raises(ConvertError, match="model name and version"):
        convert_checkpoint(checkpoint, tmp_path / "model.gguf", keyring=keyring)


def test_folder_of_shards_converts_every_tensor(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    save_checkpoint(shards / "model-00001-of-00002.safetensors", {"a": SOURCE["blk.0.w"]})
    save_checkpoint(shards / "model-00002-of-00002.safetensors", {"b": SOURCE["blk.1.w"]})

    back = read_back(convert_checkpoint(shards, tmp_path / "s.gguf").output)

    assert sorted(back) == ["a", "b"]


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    save_checkpoint(shards / "1.safetensors", {"a": SOURCE["norm"]})
    save_checkpoint(shards / "2.safetensors", {"a": SOURCE["norm"]})

    with pytest.raises(ConvertError, match="'a' is in both"):
        list_checkpoint(shards)


def test_unsupported_dtype_is_refused_naming_the_tensor_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ints.safetensors"
    save_checkpoint(path, {"steps": ("int64", np.arange(4, dtype=np.int64))})
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(ConvertError, match=r"'steps'.*I64"):
        convert_checkpoint(path, out_dir / "x.gguf")
    assert list(out_dir.iterdir()) == []


def test_header_whose_offsets_leave_the_file_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)

    with pytest.raises(ConvertError, match="fall outside the file"):
        list_checkpoint(path)


def test_not_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 a zip, perhaps a pickle inside" * 4)

    with pytest.raises(ConvertError, match="is this a safetensors file"):
        list_checkpoint(path)


def test_progress_callback_reaches_the_total(checkpoint: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    convert_checkpoint(
        checkpoint,
        tmp_path / "p.gguf",
        slice_elements=256,
        on_progress=lambda d, t: seen.append((d, t)),
    )

    done = [d for d, _ in seen]
    assert done == sorted(done) and len(done) > len(SOURCE)
    assert done[-1] == seen[-1][1] == sum(a.nbytes for _, a in SOURCE.values())


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (pytest).
_MEASURE = """
import sys
from pathlib import Path
from forseti.exporters.gguf_stream import convert_checkpoint
convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), outtype="q8_0", progress=False)
status = Path("/proc/self/status").read_text()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def _peak_rss_kib_converting(checkpoint: Path, output: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(checkpoint), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def _big_checkpoint(path: Path, total_mib: int) -> None:
    # Four BF16 tensors, so the largest tensor grows with the checkpoint too.
    cols = 4096
    rows = total_mib * (1 << 20) // 4 // 2 // cols
    block = to_bf16_bits(np.random.default_rng(1).standard_normal(1 << 20).astype(np.float32))
    tensors = {f"layer.{i}.w": ("bfloat16", np.resize(block, (rows, cols))) for i in range(4)}
    save_checkpoint(path, tensors)


def test_peak_memory_does_not_grow_with_the_checkpoint(tmp_path: Path) -> None:
    small, large = tmp_path / "small.safetensors", tmp_path / "large.safetensors"
    _big_checkpoint(small, 64)
    _big_checkpoint(large, 256)

    rss_small = _peak_rss_kib_converting(small, tmp_path / "small.gguf")
    small.unlink()
    rss_large = _peak_rss_kib_converting(large, tmp_path / "large.gguf")

    growth_mib = (rss_large - rss_small) / 1024
    # The checkpoint (and its largest tensor) grew by 192 MiB and 48 MiB; memory must not.
    assert growth_mib < 24, f"peak RSS {rss_small / 1024:.0f} -> {rss_large / 1024:.0f} MiB"
    print(
        f"peak RSS: 64 MiB ckpt {rss_small / 1024:.0f} MiB, 256 MiB ckpt {rss_large / 1024:.0f} MiB"
    )
