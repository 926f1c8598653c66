"""hybrid-serve: small open models answer with retrieval and citations; Claude plans, rewrites and
verifies only when it adds value. On Ray Serve.

One import namespace over the repository's folders (`hybrid_serve.agents` is `agents/`, …; see
pyproject.toml). This folder holds the bottom layer every other one may import: the configuration
(`config`) and the wire types (`schemas`).
"""

__version__ = "0.1.0"
