"""Model-repository control (Triton's repository extension): index, load and unload, with
every call audited with its caller, whatever front door it came through."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from forseti.core.errors import (
    FailedPrecondition,
    ForsetiError,
    InvalidArgument,
    ModelLoadError,
    Refused,
    refusal_message,
)
from forseti.server.audit_trail import AuditTrail
from forseti.server.registry.model_registry import IndexItem, ModelRegistry
from forseti.server.security.restricted import CallerIdentity

log = logging.getLogger(__name__)

_OK = "OK"
_INTERNAL = "INTERNAL"


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

    async def index(self, ready_only: bool, caller: CallerIdentity) -> list[IndexItem]:
        try:
            items = list(self.registry.index(ready_only))
        except Exception:
            await self._record("repository.index", caller, _INTERNAL, ready=ready_only)
            raise
        await self._record("repository.index", caller, _OK, ready=ready_only, models=len(items))
        return items

    def _check_explicit(self) -> None:
        if self.control_mode != "explicit":
            raise FailedPrecondition(
                "explicit model load / unload is not allowed in model control mode "
                f"'{self.control_mode}'; start the server with --model-control-mode explicit"
            )

    async def load(self, model: str, has_parameters: bool, caller: CallerIdentity) -> None:
        """Load (or reload) `model`; raises Refused with the reason, already audited."""

        async def run() -> None:
            self._check_explicit()
            if has_parameters:
                raise InvalidArgument(
                    "load parameters (config override, file content) are not supported; "
                    "publish a version folder instead"
                )
            try:
                await self.registry.load_model(model)
            except ModelLoadError as exc:
                raise InvalidArgument(f"failed to load '{model}': {exc.reason}") from None

        await self._control("repository.load", "RepositoryModelLoad", model, caller, run)

    async def unload(self, model: str, caller: CallerIdentity) -> None:
        """Unload `model`; raises Refused with the reason, already audited."""

        async def run() -> None:
            self._check_explicit()
            await self.registry.unload_model(model)

        await self._control("repository.unload", "RepositoryModelUnload", model, caller, run)

    async def _control(
        self,
        event: str,
        rpc: str,
        model: str,
        caller: CallerIdentity,
        run: Callable[[], Awaitable[None]],
    ) -> None:
        shown_model = model[:256]
        try:
            await run()
        except ForsetiError as exc:
            message = refusal_message(rpc, exc)
            await self._record(event, caller, exc.code.name, message, model=shown_model)
            raise Refused(message, exc.code) from None
        except Exception:
            await self._record(event, caller, _INTERNAL, model=shown_model)
            raise
        await self._record(event, caller, _OK, model=shown_model)
