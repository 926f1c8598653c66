"""Configuration, the `hybrid-serve` command line and local cluster start-up."""

__version__ = "0.1.0"
