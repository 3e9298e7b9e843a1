"""Helpers the test suite shares (and a new method's tests can use): tiny configs, generated datasets,
servers on loopback. Nothing in the package imports this module."""
