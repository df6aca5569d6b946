"""Benchmarks behind `vajra bench ...`; each writes a JSON result."""
