"""Helpers only the tests use: tiny configs, generated datasets in the real formats, DDP steps on local
processes, servers on loopback. Tests import them as ``support.<module>`` (pytest puts ``tests/`` on the path)."""
