"""Weights & Biases (optional): used only when installed and monitoring.wandb.enabled=true.

Modes (W&B's own environment variables): WANDB_MODE=offline writes RUN_DIR/wandb/offline-run-*
with no account and no network (`wandb sync` uploads it later); online (the default) needs an API
key, from WANDB_API_KEY (on a cluster: from a Secret) or `wandb login`'s ~/.netrc, and a reachable
server (WANDB_BASE_URL, default https://api.wandb.ai).  `check_wandb` checks all of this before
training starts, with a bounded wait; a run without it fails at once with what to do.
"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from vishwamai.errors import ConfigError
from vishwamai.monitoring.logger import SinkBase, scalars

KEY = "monitoring.wandb.enabled"
DEFAULT_SERVER = "https://api.wandb.ai"
OFFLINE_MODES = ("offline", "dryrun", "disabled")
# Seconds to wait for the W&B server: the reachability probe, and wandb.init itself.
CONNECT_TIMEOUT_S = 10.0
INIT_TIMEOUT_S = 60.0
HOW_OFFLINE = "or run offline with WANDB_MODE=offline and upload later with `wandb sync RUN_DIR/wandb/offline-run-*`"


def require_wandb() -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(KEY, "wandb is not installed: pip install 'vishwamai[wandb]' or set "
                               "monitoring.wandb.enabled=false")


def wandb_mode() -> str:
    if os.environ.get("WANDB_OFFLINE", "").lower() in ("1", "true"):  # W&B's older spelling
        return "offline"
    return os.environ.get("WANDB_MODE", "online").lower()


def api_key(server: str) -> Optional[str]:
    """WANDB_API_KEY, else the password `wandb login` stored for the server's host in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(server).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def check_wandb() -> None:
    """Everything W&B needs before a run starts: the package, and online a key and a reachable server."""
    require_wandb()
    if wandb_mode() in OFFLINE_MODES:
        return
    server = os.environ.get("WANDB_BASE_URL", DEFAULT_SERVER)
    if not api_key(server):
        raise ConfigError(KEY, f"W&B is online (WANDB_MODE={wandb_mode()}) but has no API key: set "
                               f"WANDB_API_KEY (on a cluster, from a Secret) or run `wandb login`, {HOW_OFFLINE}")
    url = urlparse(server)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(KEY, f"the W&B server {server} is unreachable ({e}); check WANDB_BASE_URL and the "
                               f"network, {HOW_OFFLINE}") from None


class WandbSink(SinkBase):
    """Metrics per logged step and the config; the summary and report image are added by
    `finish_run` after the report is written (the run stays open until then)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        require_wandb()
        self.project = cfg.monitoring.wandb.project
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.run_dir = Path(run_dir)
        self.run = None

    def start(self, trainer) -> None:
        import wandb

        self.run = wandb.init(project=self.project, dir=str(self.run_dir), config=self.config,
                              name=self.run_dir.name, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(scalars(metrics), step=step)

    def close(self, summary: Optional[dict[str, Any]] = None, failed: bool = False) -> None:
        if self.run is not None and failed:
            self.run.finish(exit_code=1)

    def summary(self) -> dict[str, Any]:
        return {"wandb_run": self.run.url or self.run.dir} if self.run is not None else {}


def finish_run(summary: dict[str, Any], images: list[Path]) -> None:
    """The open W&B run of this process (if any) gets the run's summary and report image, then ends."""
    import sys

    wandb = sys.modules.get("wandb")
    run = wandb.run if wandb is not None else None
    if run is None:
        return
    run.summary.update({k: v for k, v in summary.items()
                        if isinstance(v, (int, float, str)) and not (isinstance(v, float) and not math.isfinite(v))})
    for path in images:
        run.log({path.stem: wandb.Image(str(path))})
    run.finish()
