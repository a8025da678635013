"""cicada-async: a V2 inference server whose cold start pipelines weight fetching with compute."""

__version__ = "0.1.0"
