"""Reliability tests: the promises of docs/RELIABILITY.md, each proven by a test that can fail."""
