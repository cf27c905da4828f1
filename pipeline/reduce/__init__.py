"""The reduce stage: PCA and fusion, faiss index choice and building, the index job."""
