"""Run experiments: plan (variants x seeds), MLflow tracking, resumable sweeps."""
