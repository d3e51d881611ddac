"""Tests of the Serve application, sharing one local Ray + Serve (see conftest.py here)."""
