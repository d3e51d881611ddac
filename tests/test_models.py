"""Adding models: the real SmolLM2 conversion, local folders, manifests that catch corruption."""
import json
import shlex

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_smollm2_converts_to_a_plain_fp32_hf_folder(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # embeddings tied
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_adding_the_same_model_twice_converts_once(smollm2_home, smollm2_dir):
    from conftest import RAYFOUNDRY, env_with_home, run, tree_snapshot

    before = tree_snapshot(smollm2_dir)
    again = run([*RAYFOUNDRY, "models", "add", "smollm2-135m-instruct"], env_with_home(smollm2_home))
    assert again.returncode == 0, again.stderr
    assert "already stored, nothing to do" in again.stdout and "converting" not in again.stderr
    assert tree_snapshot(smollm2_dir) == before
    listing = run([*RAYFOUNDRY, "models", "list"], env_with_home(smollm2_home)).stdout
    assert "smollm2-135m-instruct" in listing and "MiB" in listing


def test_corrupted_file_is_detected_and_the_message_repairs_it(cli, home, tiny_llama_dir):
    assert cli("models", "add", str(tiny_llama_dir), "--name", "tiny").returncode == 0
    weights = home / "store" / "models" / "tiny" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of a tensor
    weights.write_bytes(bytes(data))

    for command in (["models", "verify", "tiny"], ["models", "add", str(tiny_llama_dir), "--name", "tiny"]):
        result = cli(*command)
        assert result.returncode == 2
        assert "model 'tiny' is corrupted: model.safetensors does not match its sha256" in result.stderr
    repair = result.stderr.split("repair it with: ")[1].strip()
    assert repair == f"rayfoundry models add {tiny_llama_dir} --name tiny --force"
    assert cli(*shlex.split(repair)[1:]).returncode == 0
    assert cli("models", "verify", "tiny").returncode == 0
