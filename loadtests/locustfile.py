"""Locust scenarios: decision calls to a Forseti (or any Triton) server through tritonclient.grpc.

Two users, each a closed loop with its own `tritonclient.grpc.InferenceServerClient` (its own
channel and HTTP/2 connection) and one call in flight at a time:

* `TritonUnaryUser`  -- `ModelInfer` (unary `client.infer`);
* `TritonStreamUser` -- `ModelStreamInfer`: one bidirectional stream per user
  (`client.start_stream` / `async_stream_infer`), the next request sent when the answer to the
  previous one has come back.

Every decision call is reported to locust's `request` event: request_type `ModelInfer` or
`ModelStreamInfer`, name `<model>[:<version>] b<batch>`, response_time in milliseconds (a float,
from `time.perf_counter`), response_length (output bytes) and the exception when the call
failed. The set-up calls (ModelMetadata and ModelConfig, made by the first user of each load
process; the others share what it built) are not load and are not reported when they succeed;
when they fail they are reported as a failed `ModelMetadata` request (so a wrong model name shows
up as failures, not as silence) and the user tries again after a short pause.

Input data: by default random data of each input's shape and datatype as the server's
ModelMetadata gives them (the batch dimension, when the model's config has max_batch_size > 0,
set to --batch-size; any other variable dimension set to 1; floats uniform in [-1, 1), integers
in [0, 10), 16 different requests per load process, each user cycling through them from its own
starting point). `--input-npy FILE` (a model with one input) or
`--input-npy NAME=FILE[,NAME=FILE...]` takes rows from .npy files instead: an array of shape
[N, *dims] gives N observations (a file of shape [*dims] one), sent --batch-size rows at a time,
in order and cycling; inputs without a file get random data.

gRPC and gevent: locust monkey-patches the process with gevent; grpc's blocking calls then need
`grpc.experimental.gevent.init_gevent()` (done below, before any channel exists), or else a
call blocks the whole hub and the users run one at a time (and a stream's reader can deadlock).

Options (added to locust's command line, so this file also works on its own):

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 16 -r 16 -t 30s \\
        --host 127.0.0.1:8001 --model policy TritonUnaryUser

`forseti loadtest` (loadtests/runner.py) drives these users headless and checks targets.

Response-time buckets: locust keeps response times in a histogram whose keys are rounded; its
default rounds everything below 100 ms to whole milliseconds, too coarse for decisions that take
about one. This file installs locust's documented hook `locust.stats.bucket_response_time` with
three significant digits below 100 ms (1 us steps below 1 ms, 10 us below 10 ms) and locust's own
rounding above.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import locust  # first: it monkey-patches the process with gevent
import locust.runners
import locust.stats

# isort: split
import gevent
from gevent.event import AsyncResult
from grpc.experimental import gevent as grpc_gevent
from locust import User, events
from locust.exception import StopUser

grpc_gevent.init_gevent()  # before any channel is made, after gevent's monkey-patching

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

from forseti.loadtests.connections import own_connection_options  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1:8001"
RANDOM_POOL = 16  # distinct random requests
MAX_POOL = 1024  # calls built in advance
SETUP_RETRY_S = 0.5  # pause after a failed set-up call
UNARY = "ModelInfer"
STREAM = "ModelStreamInfer"
SETUP = "ModelMetadata"


# ---- response-time buckets ------------------------------------------------------------------

_locust_bucket = locust.stats.bucket_response_time


def fine_bucket_response_time(response_time: float) -> float:
    """Three significant digits below 100 ms (locust's default keeps whole ms there)."""
    if response_time >= 100:
        return _locust_bucket(response_time)
    if response_time <= 0:
        return 0
    digits = 2 - math.floor(math.log10(response_time))
    return round(response_time, min(digits, 6))


if getattr(locust.stats.bucket_response_time, "__name__", "") != "fine_bucket_response_time":
    # locust annotates its buckets `int`, but it only uses them as keys of its histogram: the
    # float buckets here are what a finer histogram needs.
    locust.stats.bucket_response_time = fine_bucket_response_time  # type: ignore[assignment]

# Workers report to the master every second (locust's default is 3), so the master's
# latency-over-time window can be short.
locust.runners.WORKER_REPORT_INTERVAL = 1.0
# CPU use of every load process is sampled every 2 s (locust's default is 10).
locust.runners.CPU_MONITOR_INTERVAL = 2.0


# ---- options ---------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("Forseti decision calls (loadtests/locustfile.py)")
    group.add_argument(
        "--model",
        default="",
        help="model to call (default: the server's only ready model)",
    )
    group.add_argument("--model-version", default="", help="version (default: newest ready)")
    group.add_argument("--batch-size", type=int, default=1, help="rows per decision call")
    group.add_argument(
        "--input-npy",
        default="",
        metavar="FILE | NAME=FILE[,NAME=FILE]",
        help="take input rows from .npy files instead of random data",
    )
    group.add_argument(
        "--call-timeout",
        type=float,
        default=10.0,
        help="seconds before a decision call counts as failed",
    )


# ---- concurrency gauge (how many calls are in flight at once in this process) ----------------


class _InFlight:
    now = 0
    peak = 0  # in this process
    peak_reported: dict[str, int] = {}  # on a master: peak per worker


def peak_in_flight() -> int:
    """The most decision calls that were in flight at the same moment in one load-generating
    process (this one, or, on a master, the busiest worker)."""
    return max([_InFlight.peak, *_InFlight.peak_reported.values()])


@events.report_to_master.add_listener
def _report_peak(client_id: str, data: dict) -> None:
    data["forseti_peak_in_flight"] = _InFlight.peak


@events.worker_report.add_listener
def _collect_peak(client_id: str, data: dict) -> None:
    if "forseti_peak_in_flight" in data:
        _InFlight.peak_reported[client_id] = data["forseti_peak_in_flight"]


# ---- input data ------------------------------------------------------------------------------


def _np_type(datatype: str) -> np.dtype | None:
    """numpy dtype for a Triton datatype (tritonclient's own mapping), None if unknown."""
    found = triton_to_np_dtype(datatype)
    return None if found is None else np.dtype(found)


def parse_npy_option(text: str, input_names: list[str]) -> dict[str, Path]:
    """`FILE` (one-input model) or `NAME=FILE[,NAME=FILE...]` -> {input name: path}."""
    if not text:
        return {}
    files: dict[str, Path] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        if not sep:
            if len(input_names) != 1:
                raise ValueError(
                    f"--input-npy {part}: the model has inputs {input_names}; "
                    "name the input: --input-npy NAME=FILE"
                )
            name, path = input_names[0], part
        if name not in input_names:
            raise ValueError(f"--input-npy: the model has no input '{name}' (it has {input_names})")
        files[name] = Path(path)
    return files


class InputData:
    """The requests of one test: for each call a list of `InferInput`s. Built once per load
    process and shared by its users (tritonclient only reads them), each user cycling through
    them from its own starting point. Up to MAX_POOL calls are built in advance; a longer .npy
    file is sliced call by call."""

    def __init__(
        self,
        metadata,
        max_batch_size: int,
        batch_size: int,
        npy: dict[str, Path],
        seed: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if max_batch_size > 0 and batch_size > max_batch_size:
            raise ValueError(
                f"--batch-size {batch_size} is larger than the model's max_batch_size "
                f"{max_batch_size}"
            )
        if max_batch_size == 0 and batch_size != 1:
            raise ValueError(
                f"model '{metadata.name}' has no batch dimension (max_batch_size 0); "
                "use --batch-size 1"
            )
        self.batched = max_batch_size > 0
        self.batch_size = batch_size
        self.specs = []  # (name, datatype, shape of one call)
        self.rows: dict[str, np.ndarray] = {}
        self.random: dict[str, list[np.ndarray]] = {}
        rng = np.random.default_rng(seed)
        for tensor in metadata.inputs:
            dims = list(tensor.shape[1:] if self.batched else tensor.shape)
            dims = [d if d > 0 else 1 for d in dims]
            shape = [batch_size, *dims] if self.batched else dims
            self.specs.append((tensor.name, tensor.datatype, shape))
            if tensor.name in npy:
                self.rows[tensor.name] = self._load_rows(npy[tensor.name], tensor, dims)
            else:
                self.random[tensor.name] = [
                    random_tensor(rng, tensor.datatype, shape) for _ in range(RANDOM_POOL)
                ]
        per_call = batch_size if self.batched else 1
        counts = [len(r) for r in self.rows.values()]
        self.calls = max(1, math.ceil(max(counts) / per_call)) if counts else RANDOM_POOL
        self.pool = [self._build(i) for i in range(self.calls)] if self.calls <= MAX_POOL else None

    def _load_rows(self, path: Path, tensor, dims: list[int]) -> np.ndarray:
        try:
            array = np.load(path, allow_pickle=tensor.datatype == "BYTES")
        except (OSError, ValueError) as exc:
            raise ValueError(f"--input-npy {path}: cannot read it: {exc}") from None
        if list(array.shape) == dims:
            array = array[None]  # a single observation
        if list(array.shape[1:]) != dims:
            raise ValueError(
                f"--input-npy {path}: shape {list(array.shape)} does not fit input "
                f"'{tensor.name}' (rows of {dims}, so [N, {', '.join(map(str, dims))}])"
            )
        want = _np_type(tensor.datatype)
        if want is None:
            raise ValueError(f"input '{tensor.name}': datatype {tensor.datatype} is not supported")
        if want != np.object_ and array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise ValueError(
                    f"--input-npy {path}: dtype {array.dtype} cannot be sent as "
                    f"{tensor.datatype} for input '{tensor.name}'"
                )
            array = array.astype(want)
        if len(array) == 0:
            raise ValueError(f"--input-npy {path}: the file holds no rows")
        return array

    def _build(self, call: int) -> list:
        inputs = []
        for name, datatype, shape in self.specs:
            if name in self.rows:
                rows = self.rows[name]
                if self.batched:
                    start = call * self.batch_size
                    idx = [(start + j) % len(rows) for j in range(self.batch_size)]
                    data = np.ascontiguousarray(rows[idx]).reshape(shape)
                else:
                    data = rows[call % len(rows)]
            else:
                data = self.random[name][call % RANDOM_POOL]
            inp = grpcclient.InferInput(name, list(data.shape), datatype)
            inp.set_data_from_numpy(data)
            inputs.append(inp)
        return inputs

    def calls_from(self, start: int) -> Iterator[list]:
        """The calls in order, from `start`, forever."""
        for i in itertools.count(start):
            call = i % self.calls
            yield self.pool[call] if self.pool is not None else self._build(call)


def random_tensor(rng: np.random.Generator, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        values = [f"forseti-{v}".encode() for v in rng.integers(0, 1000, size=int(np.prod(shape)))]
        return np.array(values, dtype=np.object_).reshape(shape)
    np_type = _np_type(datatype)
    if np_type is None:
        raise ValueError(f"datatype {datatype} is not supported for random input")
    if np_type == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(np_type, np.floating):
        return rng.uniform(-1.0, 1.0, size=shape).astype(np_type)
    return rng.integers(0, 10, size=shape).astype(np_type)


# ---- the client ------------------------------------------------------------------------------


class Client(grpcclient.InferenceServerClient):
    """tritonclient's client with an idempotent close. tritonclient closes its channel again in
    `__del__`, and under gevent a second close is not harmless: every close decrements grpc's
    gevent channel count, and a close that the garbage collector runs inside another close
    (which holds grpc's lock for that count) deadlocks the process. So: close explicitly, once,
    and let `__del__` find it closed."""

    _closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            super().close()


def make_client(url: str) -> Client:
    """A client with its own HTTP/2 connection (see `own_connection_options`)."""
    return Client(url, channel_args=own_connection_options())


def resolve_model(client: grpcclient.InferenceServerClient, timeout: float = 10.0) -> str:
    """The server's only ready model, for when no --model is given."""
    index = client.get_model_repository_index(client_timeout=timeout)
    ready = sorted({m.name for m in index.models if m.state == "READY"})
    if len(ready) == 1:
        return ready[0]
    if not ready:
        raise ValueError("the server has no ready model; name one with --model")
    raise ValueError(f"the server has several ready models {ready}; choose one with --model")


def build_input_data(
    client: grpcclient.InferenceServerClient,
    model: str,
    version: str,
    batch_size: int,
    npy_option: str,
    seed: int,
    timeout: float,
) -> InputData:
    """ModelMetadata + ModelConfig -> the requests of a test. Server errors raise
    InferenceServerException; bad options raise ValueError."""
    metadata = client.get_model_metadata(model, version, client_timeout=timeout)
    config = client.get_model_config(model, version, client_timeout=timeout).config
    npy = parse_npy_option(npy_option, [t.name for t in metadata.inputs])
    return InputData(metadata, config.max_batch_size, batch_size, npy, seed)


_shared_data: dict[tuple, InputData] = {}  # per load process: (host, model, ...) -> requests
_user_numbers = itertools.count()


def _output_bytes(result) -> int:
    response = result.get_response()
    return sum(len(raw) for raw in response.raw_output_contents)


class _TritonUser(User):
    abstract = True
    host = DEFAULT_HOST
    request_type = UNARY

    def wait_time(self) -> float:  # closed loop: the next call as soon as the last one is back
        return 0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.model: str = getattr(options, "model", "") or ""
        self.version: str = getattr(options, "model_version", "") or ""
        self.batch_size: int = int(getattr(options, "batch_size", 1) or 1)
        self.npy_option: str = getattr(options, "input_npy", "") or ""
        self.timeout: float = float(getattr(options, "call_timeout", 10.0) or 10.0)
        self.client = make_client(self.host or DEFAULT_HOST)
        self.calls: Iterator[list] | None = None
        self.name = ""
        try:
            self._set_up()
        except Exception:  # locust calls on_stop only for GreenletExit and StopUser
            self.client.close()
            raise

    def _ready_calls(self) -> Iterator[list] | None:
        """The calls to make, set up first if they are not yet; None while set-up fails."""
        if self.calls is None:
            self._set_up()
        return self.calls

    def _set_up(self) -> None:
        """Metadata -> input data (self.calls); a failed attempt is reported, leaves self.calls
        None and is retried by the next task."""
        start = time.perf_counter()
        try:
            if not self.model:
                self.model = resolve_model(self.client, self.timeout)
            key = (self.host, self.model, self.version, self.batch_size, self.npy_option)
            data = _shared_data.get(key)
            if data is None:
                data = build_input_data(
                    self.client,
                    self.model,
                    self.version,
                    self.batch_size,
                    self.npy_option,
                    seed=os.getpid(),
                    timeout=self.timeout,
                )
                data = _shared_data.setdefault(key, data)
            self.calls = data.calls_from(next(_user_numbers))
        except InferenceServerException as exc:
            self._fire(SETUP, self.model or "?", start, 0, exc)
            gevent.sleep(SETUP_RETRY_S)
            return
        except ValueError as exc:  # a wrong option: no point in calling at all
            log.error("forseti locustfile: %s", exc)
            self.environment.events.user_error.fire(
                user_instance=self, exception=exc, tb=exc.__traceback__
            )
            raise StopUser() from exc
        label = self.model + (f":{self.version}" if self.version else "")
        self.name = f"{label} b{self.batch_size}"

    def _fire(self, request_type: str, name: str, start: float, length: int, exc) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


class TritonUnaryUser(_TritonUser):
    """Decision calls with unary ModelInfer."""

    @locust.task
    def decide(self) -> None:
        calls = self._ready_calls()
        if calls is None:
            return
        inputs = next(calls)
        _InFlight.now += 1
        _InFlight.peak = max(_InFlight.peak, _InFlight.now)
        start = time.perf_counter()
        try:
            result = self.client.infer(
                self.model, inputs, self.version, client_timeout=self.timeout
            )
        except InferenceServerException as exc:
            self._fire(UNARY, self.name, start, 0, exc)
        else:
            self._fire(UNARY, self.name, start, _output_bytes(result), None)
        finally:
            _InFlight.now -= 1


class TritonStreamUser(_TritonUser):
    """Decision calls over one ModelStreamInfer stream per user, one request in flight."""

    request_type = STREAM

    def on_start(self) -> None:
        self._ids = itertools.count(1)
        self._pending: tuple[str, AsyncResult[tuple[Any, Any]]] | None = None
        self._streaming = False
        super().on_start()

    def _on_response(self, result, error) -> None:
        """tritonclient's stream callback (its reader thread, a greenlet under gevent)."""
        pending = self._pending
        if pending is None:
            return  # a late answer to a call that already timed out
        request_id, answer = pending
        if result is not None and result.get_response().id != request_id:
            return  # a late answer to an earlier call
        answer.set((result, error))

    def _stop_stream(self) -> None:
        if self._streaming:
            self._streaming = False
            self.client.stop_stream(cancel_requests=True)

    @locust.task
    def decide(self) -> None:
        calls = self._ready_calls()
        if calls is None:
            return
        if not self._streaming:
            start = time.perf_counter()
            try:
                self.client.start_stream(callback=self._on_response)
            except InferenceServerException as exc:
                self._fire(STREAM, self.name, start, 0, exc)
                gevent.sleep(SETUP_RETRY_S)
                return
            self._streaming = True
        inputs = next(calls)
        request_id = str(next(self._ids))
        answer: AsyncResult[tuple[Any, Any]] = AsyncResult()
        broken = False  # the stream itself failed: the next call starts a new one
        _InFlight.now += 1
        _InFlight.peak = max(_InFlight.peak, _InFlight.now)
        start = time.perf_counter()
        try:
            self._pending = (request_id, answer)
            self.client.async_stream_infer(self.model, inputs, self.version, request_id=request_id)
            answered = answer.get(timeout=self.timeout)
            # _on_response always sets a (result, error) pair; gevent types get() Optional only
            # because set() may be given no value
            assert answered is not None
            result, error = answered
            # an error with a gRPC status ended the stream; one without is a failed request
            broken = error is not None and error.status() is not None
        except gevent.Timeout:
            result, broken = None, True
            error = InferenceServerException(
                f"no answer on the stream within {self.timeout} s (--call-timeout)",
                status="StatusCode.DEADLINE_EXCEEDED",
            )
        except InferenceServerException as exc:  # the stream is no longer usable
            result, error, broken = None, exc, True
        finally:
            self._pending = None
            _InFlight.now -= 1
        if error is not None:
            self._fire(STREAM, self.name, start, 0, error)
        else:
            self._fire(STREAM, self.name, start, _output_bytes(result), None)
        if broken:
            self._stop_stream()

    def on_stop(self) -> None:
        try:
            if getattr(self, "client", None) is not None:
                self._stop_stream()
        finally:
            super().on_stop()
