"""The KFP pipeline (training_pipeline.py) and its command line, `vishwamai-pipeline` (cli.py)."""
