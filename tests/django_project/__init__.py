"""A tiny Django project for tests/test_django.py (settings read from CROWN_TEST_* variables)."""
