"""The run directory's files (the run-directory contract, README "Run directory"): one place that names
them for every package that writes or reads a run - the recipe, monitoring, the report, export, the
Kubeflow stages.  A leaf module: it imports nothing, so anything may import it."""

CONFIG_FILE = "config.yaml"  # the run's resolved configuration, rewritten at every start
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged step (and evaluation)
SUMMARY_FILE = "summary.json"  # the run's figures, written at the end
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
