"""Plugins used by the acceptance tests (loaded by real worker and scheduler processes)."""
