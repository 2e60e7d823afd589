"""cmoe — the Connector Mixture-of-Experts as a reusable part of multimodal LLMs.

A router sends each visual token (or task) to a few small projection experts and mixes their outputs,
easing the multi-task "tug-of-war" at the connector (Uni-Med, arXiv 2409.17508).
"""

from cmoe.aggregation import aggregate_tokens, pool_tokens
from cmoe.attach import attach, attached_model, detach, load_attached, using_task_ids
from cmoe.config import CMoEConfig, ConnectorConfig, MLPConnectorConfig
from cmoe.connector import (
    CMoEConnector,
    ConnectorOutput,
    MLPConnector,
    PretrainedConnector,
    build_connector,
    load_connector,
)
from cmoe.dispatch import Backend, moe_project, select_backend
from cmoe.errors import CMoEError, UnknownNameError
from cmoe.experts import LinearExperts, MLPExperts, StackedExperts
from cmoe.hookspecs import hookimpl
from cmoe.plugin_manager import get_plugin_manager, list_plugins, register_plugin, unregister_plugin
from cmoe.registry import (
    ATTACHERS,
    BACKENDS,
    EXPERTS,
    LLMS,
    ROUTERS,
    VISION_ENCODERS,
    PluginError,
    get_attacher,
    get_backend,
    get_expert,
    get_llm,
    get_router,
    get_vision_encoder,
)
from cmoe.routers import Router, RoutingResult, load_balancing_loss, router_z_loss
from cmoe.stats import RoutingStats, mean_weight_per_task, routing_stats

__version__ = "0.1.0"

__all__ = [
    "ATTACHERS", "BACKENDS", "Backend", "CMoEConfig", "CMoEConnector", "CMoEError", "ConnectorConfig",
    "ConnectorOutput", "EXPERTS", "LLMS", "LinearExperts", "MLPConnector", "MLPConnectorConfig", "MLPExperts",
    "PluginError", "PretrainedConnector", "ROUTERS", "Router", "RoutingResult", "RoutingStats",
    "StackedExperts", "UnknownNameError", "VISION_ENCODERS", "aggregate_tokens", "attach", "attached_model",
    "build_connector", "detach",
    "get_attacher", "get_backend", "get_expert", "get_llm", "get_plugin_manager", "get_router",
    "get_vision_encoder", "hookimpl", "list_plugins", "load_balancing_loss", "load_connector",
    "load_attached", "mean_weight_per_task", "moe_project", "pool_tokens", "register_plugin", "router_z_loss",
    "routing_stats", "select_backend", "unregister_plugin", "using_task_ids",
]
