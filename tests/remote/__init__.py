"""Tests of the redis backend against a real redis-server (see conftest.py)."""
