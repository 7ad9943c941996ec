"""Runnable recipes (see docs/integrations.rst); a package so ``python -m examples...`` works
from the repository root."""
