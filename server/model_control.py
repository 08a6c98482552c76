"""Model-repository control (Triton's repository extension): index, load and unload, with
every call audited with its caller, whatever front door it came through.

A load or unload is recorded (`repository.load_requested`) before it acts; when that record
cannot be written the call is refused with UNAVAILABLE and nothing changes, so no model change
goes unaudited. Calls that change nothing (a read, a call refused before it acts) are counted,
not written one by one (AuditTrail.tally)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from forseti.core.audit import AuditError
from forseti.core.errors import (
    ForsetiError,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    Refused,
    Unavailable,
    new_request_id,
    shown,
    with_request_id,
)
from forseti.server.audit_trail import AuditTrail, peer_address
from forseti.server.registry.model_registry import IndexItem, ModelRegistry
from forseti.server.registry.version_loader import RepositoryUnavailable
from forseti.server.security.restricted import CallerIdentity

log = logging.getLogger(__name__)

_OK = "OK"
_INTERNAL = "INTERNAL"
AUDIT_UNAVAILABLE = (
    "the audit log cannot be written, so this call, which changes the models being served, "
    "is refused and nothing was changed; retry once the server's audit log is fixed"
)


# Triton rejects a file override whose path has a component longer than the file system's
# NAME_MAX (with INTERNAL and "failed to poll from model repository"; clients match both).
_NAME_MAX = 255


@dataclass(frozen=True)
class LoadParameters:
    """What a RepositoryModelLoad may carry beside the name (Triton's repository extension):
    a config override ("config": the model's config as JSON) and file overrides ("file:<path>"
    parameters with the file's bytes)."""

    config_json: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def parse_config_override(model: str, text: str) -> mc.ModelConfig:
    """The override as a ModelConfig named after the model; InvalidArgument (with Triton's
    "Invalid config override") when it is not a ModelConfig in JSON."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidArgument(
            f"failed to load '{shown(model)}', Invalid config override: {shown(str(exc), 200)}"
        ) from None
    if config.name and config.name != model:
        raise InvalidArgument(
            f"failed to load '{shown(model)}', Invalid config override: its name "
            f"'{shown(config.name)}' is not the model's"
        )
    config.name = model
    return config


def check_file_overrides(model: str, files: dict[str, bytes]) -> None:
    """Refuse file overrides. Forseti serves only what was published to the repository
    (sealed, and authenticated by the model manifest in a sealed repository): files handed
    over in a control call would bypass both, so they are refused, naming the way to publish."""
    for path in files:
        if any(len(part.encode()) > _NAME_MAX for part in path.split("/")):
            raise ForsetiError(
                f"failed to load '{shown(model)}', failed to poll from model repository: a "
                f"file override path component is longer than {_NAME_MAX} bytes",
                grpc.StatusCode.INTERNAL,
            )
    if files:
        raise InvalidArgument(
            f"failed to load '{shown(model)}': file overrides ('file:<path>' parameters) are "
            "not accepted: this server serves only artifacts published to its repository "
            "(sealed, with their model manifest); publish the version with `forseti publish` "
            "and load it by name, optionally with a config override"
        )


def check_model_name(model: str) -> None:
    """Refuse a name to load that is empty or could leave the repository, with Triton's
    texts (a name that is merely unknown fails later, as Triton's does)."""
    if not model.strip():
        raise InvalidArgument("Model name cannot be empty. Please enter a valid name to deploy.")
    if "/" in model or "\\" in model or "\x00" in model or model.strip() in (".", ".."):
        raise InvalidArgument(
            f"model name must not contain path traversal characters: '{shown(model)}'"
        )


class ModelControl:
    """Loads and unloads models on request (explicit mode) and lists the repository."""

    def __init__(
        self,
        registry: ModelRegistry,
        audit: AuditTrail,
        control_mode: str,
        *,
        unauthenticated: bool = False,
    ) -> None:
        self.registry = registry
        self.audit = audit
        self.control_mode = control_mode
        # Served with --allow-unauthenticated-control on a reachable address: every audit
        # record of a control call says so, so the log shows which calls nobody vouched for.
        self.unauthenticated = unauthenticated
        self.running = 0  # loads and unloads under way (a stop lets them finish)

    async def _record(
        self, event: str, caller: CallerIdentity, result: str, message: str = "", **what: object
    ) -> None:
        if not self.audit.enabled:
            return
        if self.unauthenticated:
            what["unauthenticated_control"] = True
        await self.audit.record(
            event,
            peer=caller.peer,
            tls_subject=caller.tls_subject,
            token_group=caller.token_group,
            **what,
            result=result,
            message=message,
        )

    async def _record_before_change(
        self, event: str, caller: CallerIdentity, **what: object
    ) -> None:
        """Like _record, but raises AuditError when the record cannot be written."""
        if not self.audit.enabled:
            return
        if self.unauthenticated:
            what["unauthenticated_control"] = True
        await self.audit.record_before_change(
            event,
            peer=caller.peer,
            tls_subject=caller.tls_subject,
            token_group=caller.token_group,
            **what,
        )

    def _tally(
        self, event: str, caller: CallerIdentity, request_id: str | None, **key: str
    ) -> None:
        """Count a call that changed nothing, with others from the same address, identity,
        method and reason (one record per window, see AuditTrail.tally)."""
        marks: dict[str, bool] = {"unauthenticated_control": True} if self.unauthenticated else {}
        self.audit.tally(
            event,
            request_id,
            peer=peer_address(caller.peer),
            tls_subject=caller.tls_subject,
            token_group=caller.token_group,
            **key,
            **marks,
        )

    async def index(self, ready_only: bool, caller: CallerIdentity) -> list[IndexItem]:
        """The repository's models. A read changes nothing, so it is counted (one
        `repository.index` record per caller and window), not audited one by one: a client
        polling the index must not cost an fsync per call."""
        try:
            await self.registry.refresh_names()
            items = list(self.registry.index(ready_only))
        except Exception:
            await self._record("repository.index", caller, _INTERNAL, ready=ready_only)
            raise
        self._tally("repository.index", caller, None, rpc="RepositoryIndex")
        return items

    def _check_explicit(self) -> None:
        # Triton's status and text (its clients and QA tests match them), then Forseti's.
        if self.control_mode != "explicit":
            raise Unavailable(
                "explicit model load / unload is not allowed if polling is enabled, nor in "
                "any mode but explicit: it is not allowed in model control mode "
                f"'{self.control_mode}'; start the server with --model-control-mode explicit"
            )

    async def load(
        self,
        model: str,
        has_parameters: bool,
        caller: CallerIdentity,
        parameters: LoadParameters | None = None,
    ) -> None:
        """Load (or reload) `model`, with a config override when `parameters` holds one;
        raises Refused with the reason, already audited. `has_parameters` without
        `parameters`: the front door could not read them, and the call is refused."""
        override: list[mc.ModelConfig] = []

        def check() -> None:
            check_model_name(model)
            self._check_explicit()
            if has_parameters and parameters is None:
                raise InvalidArgument(
                    "load parameters (config override, file content) are not supported "
                    "through this endpoint; publish a version folder instead"
                )
            if parameters is not None:
                check_file_overrides(model, parameters.files)
                if parameters.config_json is not None:
                    override.append(parse_config_override(model, parameters.config_json))

        async def run() -> None:
            try:
                if override:
                    await self.registry.load_model(model, config_override=override[0])
                else:
                    await self.registry.load_model(model)
            except NotFound as exc:
                raise NotFound(
                    f"failed to load '{shown(model)}', failed to poll from model repository: "
                    f"{exc.message}"
                ) from None
            except RepositoryUnavailable as exc:
                # Not the model's fault and retryable: the store did not answer.
                raise Unavailable(
                    f"failed to load '{model}': the model repository could not be read; the "
                    f"versions already loaded keep serving, retry once it is reachable "
                    f"({exc.reason})"
                ) from None
            except ModelLoadError as exc:
                raise InvalidArgument(f"failed to load '{model}': {exc.reason}") from None

        await self._control("repository.load", "RepositoryModelLoad", model, caller, check, run)

    async def unload(self, model: str, caller: CallerIdentity) -> None:
        """Unload `model`; raises Refused with the reason, already audited."""

        async def run() -> None:
            await self.registry.unload_model(model)

        await self._control(
            "repository.unload", "RepositoryModelUnload", model, caller, self._check_explicit, run
        )

    async def _control(
        self,
        event: str,
        rpc: str,
        model: str,
        caller: CallerIdentity,
        check: Callable[[], None],
        run: Callable[[], Awaitable[None]],
    ) -> None:
        """Run a call that changes models: `check` refuses it before anything happens (counted
        as `repository.rejected`); otherwise `<event>_requested` is written first (refused with
        UNAVAILABLE if it cannot be), then `run` acts and `<event>` records the outcome."""
        shown_model = model[:256]
        request_id = new_request_id()
        try:
            check()
        except ForsetiError as exc:
            message = self._refused(rpc, exc, request_id)
            self._tally("repository.rejected", caller, request_id, rpc=rpc, reason=exc.message)
            raise Refused(message, exc.code) from None
        try:
            await self._record_before_change(
                f"{event}_requested", caller, model=shown_model, request_id=request_id
            )
        except AuditError:
            message = self._refused(
                rpc, ForsetiError(AUDIT_UNAVAILABLE, grpc.StatusCode.UNAVAILABLE), request_id
            )
            raise Refused(message, grpc.StatusCode.UNAVAILABLE) from None
        self.running += 1
        try:
            await run()
        except ForsetiError as exc:
            message = self._refused(rpc, exc, request_id)
            await self._record(
                event, caller, exc.code.name, message, model=shown_model, request_id=request_id
            )
            raise Refused(message, exc.code) from None
        except Exception:
            await self._record(event, caller, _INTERNAL, model=shown_model, request_id=request_id)
            raise
        finally:
            self.running -= 1
        await self._record(event, caller, _OK, model=shown_model, request_id=request_id)

    @staticmethod
    def _refused(rpc: str, exc: ForsetiError, request_id: str) -> str:
        """Log a refusal under `request_id`; the message for the client, carrying the id."""
        log.info(
            "request refused",
            extra={
                "rpc": rpc,
                "code": exc.code.name,
                "reason": exc.message,
                "request_id": request_id,
            },
        )
        return with_request_id(exc.message, request_id)
