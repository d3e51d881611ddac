"""The math of compressed models: tensors in, tensors out (torch references, Triton for GPU).

This package shares its import name with Hugging Face's `kernels`, which transformers probes for.
It must never define `__version__` nor any of that package's names, so transformers keeps seeing
"hub kernels unavailable" (tests/test_kernels_name_clash.py guards this).
"""
