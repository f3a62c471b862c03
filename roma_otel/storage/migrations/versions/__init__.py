"""roma-otel's schema revisions, 001_initial .. 004_toolkit_metrics, each written as explicit PostgreSQL DDL.

Alembic loads them by path (it skips this file); they live in a package so they ship with roma-otel.
"""
