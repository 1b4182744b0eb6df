"""Runnable jobs: ``python -m launch.<job>``."""
