"""Helpers the tests share (``from support.x import y``: pytest puts ``tests/`` on the path)."""
