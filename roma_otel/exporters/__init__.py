"""SDK-side components that ship roma-otel's telemetry somewhere (Prometheus; MLflow and Postgres later)."""
