"""Compress a model with a recipe into a checkpoint that serves and evaluates like any model.

    python -m jobs.compress --model smollm2-135m-instruct --recipe configs/recipes/int8-weight.yaml \\
        --out smollm2-int8
    python -m jobs.compress --export-dense smollm2-int8 --out ./smollm2-int8-dense

--out is a name in the model store, or a path or URI. Everything the recipe and model can get
wrong is reported before any work starts.
"""
from __future__ import annotations

import argparse

from cluster.config import load_config
from cluster.errors import reports_user_errors
from cluster.store import Store, human_bytes
from jobs.compress.checkpoint import export_dense
from jobs.compress.pipeline import check_out_free, compress_model, write_result
from jobs.compress.recipe import Recipe
from jobs.models.load import model_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.compress", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model to compress: stored name, path or URI")
    parser.add_argument("--recipe", help="a recipe YAML (see configs/recipes/)")
    parser.add_argument("--export-dense", metavar="MODEL", help="instead: write MODEL's weights decompressed")
    parser.add_argument("--out", required=True, help="store name, path or URI of the result")
    parser.add_argument("--force", action="store_true", help="replace an existing result")
    parser.add_argument("--store", help="store URI (default: $RAYFOUNDRY_STORE or ~/.rayfoundry/store)")
    args = parser.parse_args(argv)
    if bool(args.export_dense) == bool(args.model or args.recipe):
        parser.error("give --model and --recipe, or --export-dense")
    if args.model and not args.recipe or args.recipe and not args.model:
        parser.error("--model and --recipe go together")
    return args


@reports_user_errors("python -m jobs.compress")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = Store(args.store)
    if args.export_dense:
        check_out_free(args.out, store, args.force)
        source = model_dir(args.export_dense, store)
        uri = write_result(lambda folder: export_dense(source, folder), args.out, store,
                           {"source": args.export_dense, "format": "hf"}, args.force)
    else:
        uri = compress_model(args.model, load_config(Recipe, args.recipe), args.out, store, args.force)
    print(f"wrote {uri} ({human_bytes(sum(f.stat().st_size for f in model_dir(uri, store).iterdir()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
