"""Text corpora -> tokenized Parquet shards with a manifest, readable as Ray Datasets."""
