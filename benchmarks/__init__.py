"""Reproducible benchmark scripts: each prints one JSON object; ``run_all.py`` runs them all.

Not tests: nothing here asserts a timing. See ``benchmarks/common.py`` for the isolation
every script gets (its own database, stream and subject prefixes and Celery queue).
"""
