"""Prefect flows, one per user-facing job; orchestration only (the work lives in tasks/ and infra/)."""
