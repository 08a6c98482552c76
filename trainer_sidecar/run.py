"""One training run: train in chunks, checkpoint, and export → parity → gate → promote.

Training proceeds in chunks of whole rollouts (on-policy) or whole vector steps (off-policy) so
that checkpoints, promotions and stop requests fall on the same boundaries an uninterrupted run
passes through; a resumed run therefore ends at exactly the spec's total timesteps.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv
from tritonclient.utils import InferenceServerException

from forseti.core.sealing.keyring import Keyring
from forseti.exporters.checked_policy import export_checked_policy
from forseti.exporters.errors import ExportError
from forseti.exporters.gguf_check import checked_gguf
from forseti.exporters.model_config import Backend, policy_config_text
from forseti.exporters.policy_description import (
    PolicyDescription,
)

from .algorithms import build_model, make_env, pin_schedule, vec_normalize_of
from .checkpoint_format import checkpoint_folders
from .checkpoint_sb3 import resume_latest, save_checkpoint
from .gate import GateDecision, GateError, evaluate_gate, gguf_actor, onnx_actor
from .monitoring import TrainingMonitor, attach_logger
from .promote import Promotion, PromotionError, promote
from .replicas import Replica, ReplicaError, open_replicas, replica_addresses, split_address
from .spec import TrainingSpec
from .training_metrics import SidecarMetrics

log = logging.getLogger(__name__)

# Off-policy chunks: how many vector steps between stop checks (on-policy: one rollout).
OFF_POLICY_CHUNK_STEPS = 256


# format -> (config backend, artifact file name in the version folder)
ARTIFACTS: dict[str, tuple[Backend, str]] = {
    "onnx": ("onnxruntime", "model.onnx"),
    "gguf": ("gguf", "model.gguf"),
}


@dataclass(frozen=True)
class Candidate:
    """A checked export: the policy, its artifacts by format, and what the checks found."""

    description: PolicyDescription
    artifacts: dict[str, bytes]
    checks: dict[str, Any]


class TrainingError(Exception):
    """A run cannot start or continue; the message says what to do."""


@dataclass
class RunResult:
    num_timesteps: int
    checkpoints: int = 0
    decisions: list[GateDecision] = field(default_factory=list)
    promotions: list[Promotion] = field(default_factory=list)
    stopped: bool = False
    failed_promotions: int = 0
    resumed_from: int | None = None


class StopRequest:
    """Set by SIGTERM/SIGINT; the run finishes its chunk, checkpoints and returns."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum: int, _frame: Any) -> None:
            log.info("stop requested; finishing the current chunk", extra={"signal": signum})
            self.set()

        for sig in previous:
            signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _read_headers(spec: TrainingSpec) -> dict[str, str] | None:
    server = spec.server
    if server.token_header is None or server.token_file is None:
        return None
    try:
        lines = server.token_file.read_text(encoding="utf-8").split()
    except OSError as exc:
        raise TrainingError(f"cannot read server.token_file: {exc.strerror}") from None
    if not lines:
        raise TrainingError("server.token_file is empty")
    return {server.token_header: lines[0]}


class TrainingRun:
    """Owns the env, the model and the server client for one ``forseti train`` invocation."""

    def __init__(
        self,
        spec: TrainingSpec,
        *,
        keyring: Keyring,
        resume: bool = False,
        continuous: bool = False,
        stop: StopRequest | None = None,
        metrics: SidecarMetrics | None = None,
        progress: bool | None = False,
        audit: Any = None,
    ) -> None:
        self.spec = spec
        self.keyring = keyring
        self.resume = resume
        self.continuous = continuous
        self.stop = stop or StopRequest()
        self.metrics = metrics if metrics is not None else SidecarMetrics()
        self.progress = progress
        self.monitor: TrainingMonitor | None = None
        self.audit = audit
        self.headers = _read_headers(spec)
        self.env: VecEnv | None = None
        self.model: BaseAlgorithm | None = None
        self._client: grpcclient.InferenceServerClient | None = None
        self._checkpointed_at: int | None = None

    # -- set-up -----------------------------------------------------------------------------

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(
                self.spec.server.url, **self.spec.server.client_options()
            )
        return self._client

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def _start(self, result: RunResult) -> None:
        spec = self.spec
        run_dir = spec.checkpoint.directory
        self.env = make_env(spec)
        self.model = build_model(spec, self.env)
        pin_schedule(self.model, spec.algorithm.total_timesteps)
        attach_logger(self.model, self.metrics)
        self.metrics.set_run_info(run=spec.run_name, algorithm=spec.algorithm.name, env=spec.env.id)
        self.monitor = TrainingMonitor(
            self.metrics, spec.algorithm.total_timesteps, progress=self.progress
        )
        if self.resume:
            info = resume_latest(
                self.model,
                run_dir,
                self.keyring,
                run_name=spec.run_name,
                spec_hash=spec.spec_hash,
                vec_normalize=vec_normalize_of(self.env),
            )
            if info is None:
                log.warning("no checkpoint yet; starting from scratch", extra={"dir": run_dir})
            else:
                result.resumed_from = self.model.num_timesteps
                log.info(
                    "resumed", extra={"checkpoint": info.number, "timesteps": info.num_timesteps}
                )
        elif checkpoint_folders(run_dir):
            raise TrainingError(
                f"{run_dir} already holds checkpoints of an earlier run; pass --resume to "
                "continue it, or set checkpoint.directory to a new folder"
            )
        self._check_server()
        self._audit(
            "train.run_start",
            run=spec.run_name,
            spec_hash=spec.spec_hash,
            resumed_from=result.resumed_from,
            total_timesteps=spec.algorithm.total_timesteps,
        )

    def _check_server(self) -> None:
        """Say at the start, not after hours of training, when the server cannot be reached."""
        try:
            self.client.is_server_live(headers=self.headers, client_timeout=5.0)
        except InferenceServerException as exc:
            log.warning(
                "server not reachable now; training goes on, but the gate will need it",
                extra={"url": self.spec.server.url, "reason": exc.message()},
            )

    # -- the loop ---------------------------------------------------------------------------

    def _chunk(self) -> int:
        if self.spec.algorithm.on_policy:
            return self.spec.rollout_timesteps
        return self.spec.env.n_envs * OFF_POLICY_CHUNK_STEPS

    def _next_boundary(self, now: int) -> int:
        spec = self.spec
        limits = [spec.algorithm.total_timesteps, now + self._chunk()]
        for every in (spec.checkpoint.interval_timesteps, self._promote_every()):
            if every:
                limits.append((now // every + 1) * every)
        return min(limits)

    def _promote_every(self) -> int | None:
        if not self.continuous:
            return None
        return self.spec.sidecar.promote_every_timesteps or self.spec.checkpoint.interval_timesteps

    def run(self) -> RunResult:
        """Train to the spec's total (or until stopped), checkpointing and promoting on the way."""
        result = RunResult(num_timesteps=0)
        with self.stop.on_signals():
            try:
                self._start(result)
                self._loop(result)
            finally:
                if self.monitor is not None:
                    self.monitor.close()
                if self.env is not None:
                    self.env.close()
                if self._client is not None:
                    self._client.close()
        assert self.model is not None
        result.num_timesteps = self.model.num_timesteps
        self._audit(
            "train.run_stop",
            run=self.spec.run_name,
            spec_hash=self.spec.spec_hash,
            timesteps=result.num_timesteps,
            stopped=result.stopped,
        )
        return result

    def _loop(self, result: RunResult) -> None:
        spec, model = self.spec, self.model
        assert model is not None
        total = spec.algorithm.total_timesteps
        callbacks: list[BaseCallback] = [self.monitor] if self.monitor is not None else []
        promote_every = self._promote_every()
        while model.num_timesteps < total:
            if self.stop:
                result.stopped = True
                if self._checkpointed_at != model.num_timesteps:
                    self._checkpoint(result)
                return
            before = model.num_timesteps
            boundary = self._next_boundary(before)
            model.learn(
                boundary - before,
                callback=callbacks or None,
                reset_num_timesteps=False,
                progress_bar=False,
            )
            now = model.num_timesteps
            if now % spec.checkpoint.interval_timesteps == 0 or now >= total:
                self._checkpoint(result)
            if promote_every and now % promote_every == 0 and now < total:
                self._promote_and_carry_on(result)
        if model.num_timesteps != total:
            log.warning(
                "run ended off its total",
                extra={"timesteps": model.num_timesteps, "total": total},
            )
        self._export_gate_promote(result)

    def _promote_and_carry_on(self, result: RunResult) -> None:
        """A sidecar's mid-run promotion: a failed one (server away, parity, refused load) is
        logged and audited, the live version keeps serving, and training goes on; the next
        interval tries again."""
        try:
            self._export_gate_promote(result)
        except (ExportError, GateError, PromotionError, InferenceServerException) as exc:
            result.failed_promotions += 1
            reason = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
            log.error(
                "promotion failed; training continues",
                extra={"error": type(exc).__name__, "reason": reason},
            )
            self._audit(
                "promotion.failed",
                run=self.spec.run_name,
                error=type(exc).__name__,
                reason=(reason or "")[:500],
            )

    # -- checkpoint, export, gate, promote --------------------------------------------------

    def _checkpoint(self, result: RunResult) -> None:
        model = self.model
        assert model is not None and self.env is not None
        start = time.perf_counter()
        info = save_checkpoint(
            model,
            self.spec.checkpoint.directory,
            self.keyring,
            run_name=self.spec.run_name,
            spec=self.spec.to_dict(),
            spec_hash=self.spec.spec_hash,
            counters={"episodes": int(getattr(model, "_episode_num", 0))},
            vec_normalize=vec_normalize_of(self.env),
            keep=self.spec.checkpoint.keep,
        )
        result.checkpoints += 1
        self._checkpointed_at = info.num_timesteps
        log.info(
            "checkpoint written",
            extra={
                "number": info.number,
                "timesteps": info.num_timesteps,
                "ms": round((time.perf_counter() - start) * 1000, 1),
            },
        )
        self._audit(
            "train.checkpoint",
            run=self.spec.run_name,
            number=info.number,
            timesteps=info.num_timesteps,
        )

    def export(self) -> Candidate:
        """Every artifact the spec asks for, checked: ONNX against SB3 (the parity check),
        GGUF against the same policy through the server's own reader. Raises ExportError."""
        spec, model, env = self.spec, self.model, self.env
        assert model is not None and env is not None
        normalizer = vec_normalize_of(env)
        start = time.perf_counter()
        checked = export_checked_policy(
            model,
            normalizer,
            env_id=spec.env.id,
            env_kwargs=dict(spec.env.kwargs),
            n=spec.evaluation.parity_observations,
            seed=spec.algorithm.seed,
        )
        description, report = checked.description, checked.parity
        checks: dict[str, Any] = {"parity": {"n": report.n, "max_abs_error": report.max_abs_error}}
        artifacts = {"onnx": checked.onnx}
        if "gguf" in spec.model.formats:
            artifacts["gguf"], agreement = checked_gguf(
                description, checked.samples, spec.model.gguf_type
            )
            checks["gguf"] = {"type": spec.model.gguf_type, "agreement": agreement}
        seconds = time.perf_counter() - start
        log.info(
            "exported",
            extra={
                "formats": ",".join(artifacts),
                "parity_n": report.n,
                "max_abs_error": report.max_abs_error,
                "ms": round(seconds * 1000, 1),
            },
        )
        for fmt, data in artifacts.items():
            self._audit(
                "export.done",
                run=spec.run_name,
                timesteps=model.num_timesteps,
                format=fmt,
                bytes=len(data),
                parity_max_abs_error=float(report.max_abs_error),
            )
        return Candidate(description, artifacts, checks)

    def served_models(self) -> list[tuple[str, str]]:
        """(model name, format) pairs: the first format is the model the gate judges and
        clients call; each further format is published alongside as ``<name>_<format>``."""
        name = self.spec.model.name
        return [
            (name if i == 0 else f"{name}_{fmt}", fmt)
            for i, fmt in enumerate(self.spec.model.formats)
        ]

    def _config_text(self, model_name: str, fmt: str, description: Any) -> str:
        spec = self.spec
        return policy_config_text(
            model_name,
            description,
            max_batch_size=spec.model.max_batch_size,
            backend=ARTIFACTS[fmt][0],
            parameters={
                "env_id": spec.env.id,
                "algorithm": spec.algorithm.name,
                "training_run": spec.run_name,
                "spec_hash": spec.spec_hash,
            },
        )

    def _export_gate_promote(self, result: RunResult) -> None:
        spec, model = self.spec, self.model
        assert model is not None
        try:
            candidate = self.export()
        except ExportError as exc:
            log.error("export check failed; not promoting", extra={"reason": str(exc)})
            self._audit("export.failed", run=spec.run_name, reason=str(exc)[:500])
            raise
        served = self.served_models()
        primary_name, primary_format = served[0]
        primary = candidate.artifacts[primary_format]
        decision = evaluate_gate(
            onnx_actor(primary) if primary_format == "onnx" else gguf_actor(primary),
            self.client,
            model=primary_name,
            env_id=spec.env.id,
            episodes=spec.evaluation.episodes,
            seed=spec.evaluation.seed,
            margin=spec.evaluation.margin,
            env_kwargs=dict(spec.env.kwargs),
            headers=self.headers,
            batch=spec.model.max_batch_size,
        )
        result.decisions.append(decision)
        self.metrics.record_gate(
            decision.candidate_return, decision.live_return, decision.promoted, decision.reason
        )
        self._audit(
            "gate.decision",
            run=spec.run_name,
            candidate_return=decision.candidate_return,
            live_return=decision.live_return,
            live_version=decision.live_version,
            margin=decision.margin,
            promoted=decision.promoted,
        )
        if not decision.promoted:
            return
        manifest = {
            "training_run": spec.run_name,
            "spec_hash": spec.spec_hash,
            "env_id": spec.env.id,
            "algorithm": spec.algorithm.name,
            "timesteps": model.num_timesteps,
            **candidate.checks,
            "gate": {
                "candidate_return": decision.candidate_return,
                "live_return": decision.live_return,
                "live_version": decision.live_version,
                "margin": decision.margin,
                "episodes": decision.episodes,
                "seed": spec.evaluation.seed,
            },
        }
        description = candidate.description
        probe = np.zeros((1, description.obs_dim), dtype=np.float32)
        with self._replicas() as replicas:
            for model_name, fmt in served:
                self._promote_one(result, replicas, model_name, fmt, candidate, manifest, probe)

    @contextmanager
    def _replicas(self) -> Iterator[list[Replica]]:
        """The replicas a promotion must reach (see trainer_sidecar/replicas.py)."""
        server = self.spec.server
        if not server.endpoints and server.replicas_dns is None:
            yield [Replica(server.url, self.client)]
            return
        try:
            addresses = replica_addresses(server.url, server.endpoints, server.replicas_dns)
        except ReplicaError as exc:
            raise PromotionError(str(exc)) from None
        tls_name = None if server.replicas_dns is None else split_address(server.replicas_dns)[0]
        with open_replicas(addresses, server.client_options(), tls_name) as replicas:
            yield replicas

    def _promote_one(
        self,
        result: RunResult,
        replicas: list[Replica],
        model_name: str,
        fmt: str,
        candidate: Candidate,
        manifest: dict[str, Any],
        probe: np.ndarray,
    ) -> None:
        spec = self.spec
        filename = ARTIFACTS[fmt][1]
        try:
            promotion = promote(
                replicas,
                repository=spec.model.repository,
                model=model_name,
                config_text=self._config_text(model_name, fmt, candidate.description),
                artifacts={filename: candidate.artifacts[fmt]},
                manifest={**manifest, "format": fmt},
                keyring=self.keyring,
                probe=probe,
                timeout_s=spec.server.ready_timeout_s,
                headers=self.headers,
            )
        except PromotionError as exc:
            if exc.failed:
                # Which replicas serve the new version and which do not, and why.
                failed = list(exc.failed.items())[:64]
                self._audit(
                    "promotion.incomplete",
                    run=spec.run_name,
                    model=model_name,
                    format=fmt,
                    version=exc.version,
                    serving_replicas=exc.served[:64],
                    failed_replicas=[address for address, _ in failed],
                    reasons=[why[:300] for _, why in failed],
                )
            raise
        result.promotions.append(promotion)
        self.metrics.record_promotion(promotion.version, promotion.publish_to_serving_seconds)
        self._audit(
            "promotion.done",
            run=spec.run_name,
            model=model_name,
            format=fmt,
            version=promotion.version,
            publish_to_serving_s=promotion.publish_to_serving_seconds,
            replicas=list(promotion.replica_seconds)[:64],
        )
