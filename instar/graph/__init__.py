"""The stage graph: DAG validation, fingerprints, plans, run state and the runner."""
