"""Which scheduler a loaded version gets, from its config and how fast it warmed up."""

from __future__ import annotations

from forseti.core.repository.config import ModelSpec, parameter
from forseti.server.backends.base import Backend
from forseti.server.scheduler.base import Scheduler
from forseti.server.scheduler.dynamic_batcher import DynamicBatcher
from forseti.server.scheduler.inline import InlineScheduler
from forseti.server.scheduler.threaded import ThreadedScheduler

# Models whose slowest warm-up run is under this run inline on the event loop.
INLINE_BUDGET_NS = 1_000_000


def create_scheduler(spec: ModelSpec, backend: Backend, warm_ns: int) -> Scheduler:
    """`dynamic_batching` in the config gets the batcher; otherwise a fast single-instance
    model runs inline and anything else on instance threads. The `forseti.execution`
    parameter (`inline` or `threaded`) overrides the choice. Raises ModelLoadError for
    batching settings that do not fit the model."""
    if spec.config.HasField("dynamic_batching"):
        return DynamicBatcher(spec, backend)
    choice = parameter(spec.config, "forseti.execution", "auto")
    inline = choice == "inline" or (
        choice != "threaded" and backend.instance_count == 1 and warm_ns < INLINE_BUDGET_NS
    )
    return InlineScheduler(backend) if inline else ThreadedScheduler(backend, spec.name)
