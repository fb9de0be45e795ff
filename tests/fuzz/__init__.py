"""Fuzzing of the client leg: raw request bytes through the scanner, h11, the header rules and
the preset's prefix tables (see README.md beside this file)."""
