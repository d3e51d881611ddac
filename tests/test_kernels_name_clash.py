"""Our top-level `kernels/` shares its name with Hugging Face's `kernels` package.

transformers probes for that package at import time and, if it believes it is there, imports
names from it. With the repository on sys.path, that probe finds our package; it must still
conclude "not available", or loading any model through transformers breaks.
"""
import subprocess
import sys

from conftest import REPO

PROBE = """
import kernels, pathlib, sys
assert pathlib.Path(kernels.__file__).resolve().parent == pathlib.Path(sys.argv[1]) / "kernels", kernels.__file__
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available(), "transformers mistakes our kernels/ for Hugging Face's kernels"
import transformers.integrations.hub_kernels
import torch
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
logits = LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 32)
print("ok")
"""


def test_transformers_hub_kernels_integration_survives_our_kernels_package():
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
