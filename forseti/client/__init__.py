"""forseti.client: decisions for the calling service, with deadlines and fallbacks, replicas,
hedging and local mode. Needs only the server's light dependencies (no torch).

    from forseti.client import DecisionClient, LastGoodAction

    client = DecisionClient(["10.0.0.1:8001", "10.0.0.2:8001"], "cartpole",
                            deadline_ms=20, fallback=LastGoodAction(default=0))
    decision = client.decide(obs, key=user_id)
"""

from forseti.client.async_client import AsyncDecisionClient
from forseti.client.credentials import TLSConfig
from forseti.client.decision import Decision
from forseti.client.errors import ClientConfigError, DecisionRejected
from forseti.client.fallback import CallableFallback, Fallback, FixedAction, LastGoodAction
from forseti.client.hedging import Hedging
from forseti.client.local_mode import LocalPolicy
from forseti.client.metrics import ClientMetrics
from forseti.client.sync_client import DecisionClient

__all__ = [
    "AsyncDecisionClient",
    "CallableFallback",
    "ClientConfigError",
    "ClientMetrics",
    "Decision",
    "DecisionClient",
    "DecisionRejected",
    "Fallback",
    "FixedAction",
    "Hedging",
    "LastGoodAction",
    "LocalPolicy",
    "TLSConfig",
]
