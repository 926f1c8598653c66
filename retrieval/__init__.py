"""Hybrid retrieval: chunking, dense (FAISS) + BM25 (bm25s) with reciprocal-rank fusion, on disk."""
