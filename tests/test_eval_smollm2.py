"""The yardstick: `rayfoundry eval ppl` on the real SmolLM2 equals plain transformers."""
import json
import math

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import RAYFOUNDRY, env_with_home, run

TOKENS, WINDOW = 4096, 512  # eight windows: the comparison is the same at any length


def validation_tokens_read_directly(dataset_dir, count):
    """The first `count` validation tokens, read with pyarrow alone (not through our reader)."""
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    ids = []
    for shard in manifest["splits"]["validation"]["shards"]:
        for row in pq.read_table(dataset_dir / shard["file"]).column("tokens").to_pylist():
            ids.extend(row)
    return torch.tensor(ids[:count])


def transformers_ppl(model_dir, tokens, window):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for piece in torch.split(tokens, window):
            loss = model(input_ids=piece[None], labels=piece[None]).loss.double().item()
            total += loss * (len(piece) - 1)
            count += len(piece) - 1
    return math.exp(total / count)


def test_eval_ppl_equals_transformers_on_smollm2(smollm2_home, smollm2_dir):
    result = run([*RAYFOUNDRY, "eval", "ppl", "--model", "smollm2-135m-instruct", "--data", "shakespeare",
                  "--tokens", str(TOKENS), "--window", str(WINDOW)], env_with_home(smollm2_home))
    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert {k: reported[k] for k in ("tokens", "model", "data")} == {
        "tokens": TOKENS, "model": "smollm2-135m-instruct", "data": "shakespeare"}
    assert reported["nll"] == pytest.approx(math.log(reported["ppl"]), rel=1e-12)

    tokens = validation_tokens_read_directly(smollm2_home / "store" / "datasets" / "shakespeare", TOKENS)
    expected = transformers_ppl(smollm2_dir, tokens, WINDOW)
    print(f"SmolLM2-135M-Instruct fp32, shakespeare validation, {TOKENS} tokens: ppl {reported['ppl']:.6f} "
          f"(transformers: {expected:.6f})")
    assert f"{reported['ppl']:.4g}" == f"{expected:.4g}"
