"""Every version-specific or private access to a dependency, one module per dependency.

``dspy``: which LM, tool and executor hooks the installed DSPy offers (capability detection, never
version strings). ``otel``: the OpenTelemetry SDK's private fields behind roma-otel's fast paths, each
verified by a probe before it is taken, and the Prometheus exporter's constructor. ``mlflow``: the
tracking APIs that differ from MLflow 3.6 to the newest (span conversion, trace tags, artifacts).
``degraded`` records what could not be instrumented on the installed versions, warns once and counts it.
"""
