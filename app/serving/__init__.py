"""What an API process serves and how: the reference embeddings store, the model bundle and
the state that swaps it (see the modules)."""
