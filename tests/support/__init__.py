"""Helpers for the end-to-end tests: a recording upstream, raw clients, a proxy launcher."""
