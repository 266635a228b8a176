"""Tests of the web demo, most in a real headless Chromium.

A package, so that its conftest imports as `browser.conftest`: under `--doctest-modules` a second plain
`conftest` module collected before `tests/conftest.py` would clash with it.
"""
