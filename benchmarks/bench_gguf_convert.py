"""Streaming GGUF converter throughput beside `cp` of the same checkpoint, in one run.

What it does:

* writes a synthetic BF16 safetensors checkpoint of at least ``--size-gb`` (default 2.2 GB) in
  a temporary folder, with LLaMA-7B shapes (hidden 4096, MLP 11008, vocabulary 32000): the
  token embedding, then whole transformer blocks (q/k/v/o, gate/up/down, two norms) until the
  size is reached; values are seeded normal * 0.02 (a 16 MiB random block tiled);
* times ``cp`` of that file followed by an fsync of the copy (the converter fsyncs too);
* runs the converter (``forseti.exporters.gguf_stream``) in a fresh subprocess per output type
  (``--outtypes``, default f16 and q8_0; ``--seal`` adds a sealed q8_0 run), timing it from
  outside and reading the child's own peak RSS (VmHWM) when it ends;
* prints a table: MB/s of checkpoint read, seconds, output size, peak RSS, and the
  extrapolated time for a 7B-parameter BF16 checkpoint (14 GB) against the 5-minute target.

Both cp and the converter read the checkpoint from the page cache (it was just written), so
the comparison is between the two, not against the disk. It is a benchmark, not a test: it
exits 0 whatever the numbers are, unless the run failed (exit 2).

    .venv/bin/python -m benchmarks.bench_gguf_convert               # ~2.2 GB, a few minutes
    .venv/bin/python -m benchmarks.bench_gguf_convert --size-gb 0.5 --seal --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TARGET_SECONDS = 300.0
SEVEN_B_BF16_BYTES = 7_000_000_000 * 2

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
BLOCK_SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("attn_norm.weight", (HIDDEN,)),
    ("attn_q.weight", (HIDDEN, HIDDEN)),
    ("attn_k.weight", (HIDDEN, HIDDEN)),
    ("attn_v.weight", (HIDDEN, HIDDEN)),
    ("attn_output.weight", (HIDDEN, HIDDEN)),
    ("ffn_norm.weight", (HIDDEN,)),
    ("ffn_gate.weight", (MLP, HIDDEN)),
    ("ffn_up.weight", (MLP, HIDDEN)),
    ("ffn_down.weight", (HIDDEN, MLP)),
]

# The child measures itself: VmHWM is this process's own peak (ru_maxrss would include the
# parent's peak, which Linux carries over exec).
_CHILD = """
import json, sys
from pathlib import Path
from forseti.exporters.gguf_stream import convert_checkpoint
from forseti.core.sealing.keyring import Keyring
keyring = Keyring.load(sys.argv[4]) if len(sys.argv) > 4 else None
r = convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), outtype=sys.argv[3],
                       keyring=keyring, model="bench", version=1, progress=False)
status = Path("/proc/self/status").read_text()
hwm = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"seconds": r.seconds, "written": r.bytes_written, "vmhwm_kib": hwm}))
"""


@dataclass
class Row:
    """One measured way of producing the output."""

    what: str
    seconds: float  # wall time seen from outside, process start included
    inner_seconds: float | None  # the converter's own timing (no interpreter start-up)
    read_bytes: int
    out_bytes: int
    peak_rss_mib: float | None

    @property
    def mb_per_s(self) -> float:
        return self.read_bytes / 1e6 / self.seconds

    @property
    def seven_b_seconds(self) -> float:
        return SEVEN_B_BF16_BYTES / (self.read_bytes / self.seconds)


def checkpoint_tensors(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Embedding plus whole transformer blocks until the BF16 size reaches ``size_bytes``."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (VOCAB, HIDDEN))]
    total = VOCAB * HIDDEN * 2
    block = 0
    while total < size_bytes:
        for name, shape in BLOCK_SHAPES:
            tensors.append((f"blk.{block}.{name}", shape))
            total += int(np.prod(shape)) * 2
        block += 1
    return tensors


def write_checkpoint(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """Stream a BF16 safetensors file tensor by tensor (never the whole model in memory)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "source": "bench_gguf_convert"}}
    offset = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    values = np.random.default_rng(0).standard_normal(8 << 20).astype(np.float32) * 0.02
    block = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bfloat16
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in tensors:
            remaining = int(np.prod(shape))
            while remaining:
                part = block[: min(remaining, block.size)]
                fh.write(part.tobytes())
                remaining -= part.size
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def check_with_safetensors(path: Path, expected: int) -> None:
    """safetensors itself must accept the synthetic file (BF16 cannot load into numpy, so the
    check reads names and shapes only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
        if len(names) != expected:
            raise RuntimeError(f"safetensors sees {len(names)} tensors, expected {expected}")
        f.get_slice(names[0]).get_shape()


def time_cp(src: Path, dst: Path) -> Row:
    started = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    size = dst.stat().st_size
    dst.unlink()
    return Row("cp + fsync", seconds, None, size, size, None)


def time_convert(
    src: Path, out_dir: Path, outtype: str, keyring_path: Path | None, read_bytes: int
) -> Row:
    out = out_dir / "model.gguf"
    argv = [sys.executable, "-c", _CHILD, str(src), str(out), outtype]
    if keyring_path is not None:
        argv.append(str(keyring_path))
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"converter failed ({outtype}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for produced in out_dir.iterdir():
        produced.unlink()
    what = f"convert -> {outtype}" + (" sealed" if keyring_path else "")
    return Row(
        what, seconds, report["seconds"], read_bytes, report["written"], report["vmhwm_kib"] / 1024
    )


def print_report(rows: list[Row], size: int) -> None:
    print(f"\ncheckpoint: {size / 1e9:.2f} GB BF16; 7B extrapolation at 14.0 GB, target < 5 min")
    header = (
        f"{'':<24}{'MB/s':>8}{'seconds':>9}{'(inner)':>9}{'out GB':>8}"
        f"{'peak RSS MiB':>14}{'7B BF16':>10}{'< 5 min':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        inner = f"{r.inner_seconds:.1f}" if r.inner_seconds is not None else "-"
        rss = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "-"
        seven = r.seven_b_seconds
        ok = "yes" if seven < TARGET_SECONDS else "no"
        print(
            f"{r.what:<24}{r.mb_per_s:>8.0f}{r.seconds:>9.1f}{inner:>9}{r.out_bytes / 1e9:>8.2f}"
            f"{rss:>14}{seven / 60:>7.1f} min{ok:>9}"
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_gguf_convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size-gb", type=float, default=2.2, help="checkpoint size (default 2.2)")
    p.add_argument("--outtypes", default="f16,q8_0", help="comma-separated (f32, f16, q8_0)")
    p.add_argument("--seal", action="store_true", help="also convert to q8_0 sealed (format 2)")
    p.add_argument("--dir", type=Path, help="where the temporary folder goes (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    size = int(args.size_gb * 1e9)
    outtypes = [t for t in args.outtypes.split(",") if t]
    tensors = checkpoint_tensors(size)
    need = sum(int(np.prod(s)) for _, s in tensors) * 2 * 2.1
    where = args.dir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    if free < need:
        print(f"bench_gguf_convert: {where} has {free / 1e9:.1f} GB free, needs {need / 1e9:.1f}")
        return 2
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-gguf-", dir=where) as tmp:
            tmp_path = Path(tmp)
            src = tmp_path / "model.safetensors"
            started = time.perf_counter()
            data_bytes = write_checkpoint(src, tensors)
            check_with_safetensors(src, len(tensors))
            print(
                f"wrote {src.stat().st_size / 1e9:.2f} GB, {len(tensors)} tensors "
                f"in {time.perf_counter() - started:.0f}s"
            )
            out_dir = tmp_path / "out"
            out_dir.mkdir()
            rows.append(time_cp(src, tmp_path / "copy.safetensors"))
            for outtype in outtypes:
                rows.append(time_convert(src, out_dir, outtype, None, data_bytes))
                print(f"  {rows[-1].what}: {rows[-1].seconds:.1f}s", flush=True)
            if args.seal:
                from forseti.core.sealing.keyring import Keyring

                keyring_path = tmp_path / "keyring.json"
                Keyring.generate().save(keyring_path)
                rows.append(time_convert(src, out_dir, "q8_0", keyring_path, data_bytes))
            rows.append(time_cp(src, tmp_path / "copy.safetensors"))  # again: cp after, too
    except Exception as exc:
        print(f"bench_gguf_convert: the run failed: {exc}", file=sys.stderr)
        return 2
    print_report(rows, data_bytes)
    print(f"\n(cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end)")
    if args.json is not None:
        doc = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "checkpoint_bytes": data_bytes,
            "rows": [asdict(r) | {"mb_per_s": r.mb_per_s} for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
