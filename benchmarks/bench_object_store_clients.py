"""Compare object-store clients against a local S3 server (moto): small GET and LIST latency
and conditional-write support. Clients that are not installed are skipped.

    python -m benchmarks.bench_object_store_clients [--calls 200]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

from testkit.object_store import s3_server


def _p50_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, str]] = []
    with s3_server() as s3:
        boto = s3.client()
        boto.create_bucket(Bucket="bench")
        for i in range(20):
            boto.put_object(Bucket="bench", Key=f"m/{i}/f", Body=b"x" * 1000)

        rows.append(
            (
                "boto3",
                _p50_ms(
                    lambda: boto.get_object(Bucket="bench", Key="m/3/f")["Body"].read(), args.calls
                ),
                _p50_ms(lambda: boto.list_objects_v2(Bucket="bench", Prefix="m/"), args.calls),
                "IfNoneMatch / IfMatch",
            )
        )
        import obstore
        from obstore.store import S3Store

        store = S3Store("bench", client_options={"allow_http": True})
        rows.append(
            (
                "obstore",
                _p50_ms(lambda: obstore.get(store, "m/3/f").bytes(), args.calls),
                _p50_ms(lambda: obstore.list(store, "m/").collect(), args.calls),
                'mode="create" / mode={"e_tag": ...}',
            )
        )
        try:
            s3fs: Any = importlib.import_module("s3fs")  # optional, untyped
        except ImportError:
            s3fs = None
        if s3fs is not None:
            fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint, use_listings_cache=False)
            rows.append(
                (
                    "s3fs",
                    _p50_ms(lambda: fs.cat_file("bench/m/3/f"), args.calls),
                    _p50_ms(lambda: fs.ls("bench/m/", refresh=True), args.calls),
                    "not exposed",
                )
            )
    print("| client | GET 1 kB p50 (ms) | LIST 20 p50 (ms) | conditional writes |")
    print("|---|---|---|---|")
    for name, get_ms, list_ms, cond in rows:
        print(f"| {name} | {get_ms:.2f} | {list_ms:.2f} | {cond} |")


if __name__ == "__main__":
    main()
