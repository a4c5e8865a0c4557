"""vishwamai: train and compress transformer language models, laptop to Kubeflow.

Importing the package is cheap: torch, Hydra and every optional backend
(mlflow, optuna, kfp, ray, wandb) are imported only by the modules that use them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
