"""Load, capacity, quality and micro-benchmarks; each writes JSON, Markdown and PNG."""
