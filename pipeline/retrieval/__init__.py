"""Search: describing queries, faiss search, region re-ranking and query expansion."""
