"""Runnable examples (the test suite imports them too)."""
