"""Inference engines behind the SLM deployment. Each is imported only when chosen."""

from hybrid_serve.engines.base import Engine, EngineFailed, engine_class, make_engine, warm_up

__all__ = ["Engine", "EngineFailed", "engine_class", "make_engine", "warm_up"]
