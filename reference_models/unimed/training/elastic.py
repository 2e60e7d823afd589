"""What torchrun's elastic restarts (``--max-restarts``) need on several nodes, read from a worker's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping


def restart_hazard(env: Mapping[str, str] = os.environ) -> str | None:
    """A warning for a worker started by torchrun on several nodes with ``--max-restarts`` and the rendezvous store
    shared with the workers (torchrun's default): a node whose workers restart for another node's failure counts
    restarts on its own, so after a restart the workers can read each other's addresses from a previous attempt
    and hang while connecting (pytorch issue 135712). None when the hazard does not apply."""
    nodes = int(env.get("GROUP_WORLD_SIZE", "1") or 1)
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
    if nodes < 2 or restarts < 1 or not shared:
        return None
    return (f"warning: torchrun --max-restarts {restarts} on {nodes} nodes shares its rendezvous store with the "
            "workers, and restarted workers can then hang while connecting (pytorch issue 135712); set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node")
