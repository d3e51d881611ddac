"""Model implementations over the paged KV cache, loading Hugging Face weights."""
