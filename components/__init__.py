"""KFP v2 lightweight components, one per stage: prepare, pretrain (or pretrain_job: a multi-node
PyTorchJob), distill, prune, quantize, evaluate, export (the final model in the Hugging Face layout).

Each is a thin function around vishwamai.kubeflow.stages (the package's own entry points;
no training logic here).  KFP copies only a component function's source into the pod, so each
function imports what it needs inside its body, and the image must have vishwamai (and kfp)
installed: `packages_to_install=[]`, `install_kfp_package=False`.  The same functions run in
kfp.local's SubprocessRunner (which ignores base_image) against the current environment.

    from components import build_components
    c = build_components("registry.example.com/vishwamai:0.1.0-cuda")
    c["pretrain"], c["distill"], ...
"""

from __future__ import annotations

import os
from typing import Callable

from kfp import dsl

from components.distill import distill
from components.evaluate import evaluate
from components.export import export
from components.prepare import prepare
from components.pretrain import pretrain
from components.pretrain_job import pretrain_job
from components.prune import prune
from components.quantize import quantize

# The image built from the repository's Dockerfile; override with --image or VISHWAMAI_IMAGE.
DEFAULT_IMAGE = os.environ.get("VISHWAMAI_IMAGE", "vishwamai:0.1.0-cpu")

STAGES: dict[str, Callable] = {
    "prepare": prepare,
    "pretrain": pretrain,
    "pretrain_job": pretrain_job,
    "distill": distill,
    "prune": prune,
    "quantize": quantize,
    "evaluate": evaluate,
    "export": export,
}


def build_components(image: str = DEFAULT_IMAGE) -> dict[str, Callable]:
    """The stage components, running in `image`."""
    return {name: dsl.component(fn, base_image=image, packages_to_install=[], install_kfp_package=False)
            for name, fn in STAGES.items()}
