"""Benchmarks of fastproxy beside nginx and HAProxy: a comparison runner and locust scenarios.

Never run in CI and never imported by the package or its tests. See ``bench/README.md``.
"""
