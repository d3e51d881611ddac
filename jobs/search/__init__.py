"""Search over compression recipes with Ray Tune: see jobs/search/__main__.py."""
