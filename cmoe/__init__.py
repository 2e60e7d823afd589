"""cmoe — the Connector Mixture-of-Experts as a reusable part of multimodal LLMs.

A router sends each visual token (or task) to a few small projection experts and mixes their outputs,
easing the multi-task "tug-of-war" at the connector (Uni-Med, arXiv 2409.17508).
"""

from cmoe.aggregation import aggregate_tokens
from cmoe.config import CMoEConfig, ConnectorConfig, MLPConnectorConfig
from cmoe.connector import (
    CMoEConnector,
    ConnectorOutput,
    MLPConnector,
    PretrainedConnector,
    build_connector,
    load_connector,
)
from cmoe.dispatch import BACKENDS, Backend, moe_project, register_backend, select_backend
from cmoe.errors import CMoEError, UnknownNameError
from cmoe.experts import EXPERTS, LinearExperts, MLPExperts, StackedExperts, get_expert
from cmoe.routers import (
    ROUTERS,
    Router,
    RoutingResult,
    get_router,
    load_balancing_loss,
    router_z_loss,
)
from cmoe.stats import RoutingStats, mean_weight_per_task, routing_stats

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Backend", "CMoEConfig", "CMoEConnector", "CMoEError", "ConnectorConfig", "ConnectorOutput",
    "EXPERTS", "LinearExperts", "MLPConnector", "MLPConnectorConfig", "MLPExperts", "PretrainedConnector",
    "ROUTERS", "Router", "RoutingResult", "RoutingStats", "StackedExperts", "UnknownNameError",
    "aggregate_tokens", "build_connector", "get_expert", "get_router", "load_balancing_loss", "load_connector",
    "mean_weight_per_task", "moe_project", "register_backend", "router_z_loss", "routing_stats",
    "select_backend",
]
