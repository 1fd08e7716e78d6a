"""Benchmarks behind ``kvtier bench``: each module has one ``run_*`` function returning a JSON-ready dict."""
