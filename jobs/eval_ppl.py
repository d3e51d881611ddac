"""Perplexity of a model on the first N tokens of a prepared dataset's split.

    python -m jobs.eval_ppl --model smollm2-135m-instruct --data shakespeare --tokens 20480
    (or `rayfoundry eval ppl ...`)

Prints one JSON object: {"ppl", "nll", "tokens", "model", "data", ...}.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm import tqdm

from cluster.errors import UserError, reports_user_errors
from cluster.store import Artifact, Store
from jobs.data.prepared import check_tokenized_for, open_dataset
from jobs.data.shards import read_tokens
from jobs.eval.perplexity import perplexity
from jobs.models.load import context_length, load_causal_lm, model_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rayfoundry eval ppl", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="stored model name, path or URI")
    parser.add_argument("--data", required=True, help="prepared dataset name, path or URI")
    parser.add_argument("--tokens", type=int, default=20480, help="first N tokens of the split (default 20480)")
    parser.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--split", default="validation", choices=["validation", "train"])
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    return parser.parse_args(argv)


def check_request(args: argparse.Namespace, dataset: Artifact, model_path) -> None:
    if args.tokens < 2 or args.window < 2 or args.batch_size < 1:
        raise UserError("--tokens and --window must be at least 2, --batch-size at least 1")
    limit = context_length(model_path)
    if args.window > limit:
        raise UserError(f"--window {args.window} is larger than the model's context of {limit} tokens")
    available = dataset.manifest["splits"][args.split]["tokens"]
    if args.tokens > available:
        raise UserError(f"dataset '{dataset.name}' has only {available} {args.split} tokens; ask for at most that")
    check_tokenized_for(dataset, model_path, args.model)


@reports_user_errors("rayfoundry eval ppl")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = Store(args.store)
    path = model_dir(args.model, store)
    dataset = open_dataset(args.data, store)
    check_request(args, dataset, path)
    tokens = torch.from_numpy(read_tokens(dataset, args.split, args.tokens).astype("int64"))
    model = load_causal_lm(path)
    windows = -(-args.tokens // args.window)
    with tqdm(total=windows, desc="perplexity", unit="window", file=sys.stderr) as bar:
        result = perplexity(model, tokens, args.window, args.batch_size, progress=bar.update)
    print(json.dumps({
        "ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "predicted": result.predicted,
        "windows": result.windows, "window": args.window, "split": args.split,
        "model": args.model, "data": args.data,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
