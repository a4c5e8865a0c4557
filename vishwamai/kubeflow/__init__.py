"""Kubeflow runtime pieces that live in the image (the package), not in the repository's
components/, pipelines/ and manifests/ folders:

  stages.py  what each KFP component runs: an ordinary vishwamai entry point, artifacts in and out
  pytorchjob.py  multi-node pretraining from the pipeline: a PyTorchJob created, followed, collected
  launch.py  the PyTorchJob / TrainJob pod command: torchrun from the operator's env, with exit
             codes the Training Operator's ExitCode restart policy understands
  wait.py    the worker init container: wait until the master's Service resolves and listens
"""
