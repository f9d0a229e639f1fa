"""Save a model as the recipes load it (a GGUF file dequantised to fp32) into a plain Hugging Face folder, so that
the many short runs of `make value` each load safetensors instead of dequantising the GGUF file again."""

from __future__ import annotations

import argparse

from hf_fg2u.cli.arguments import ModelArguments
from hf_fg2u.cli.models import load_model_and_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--gguf_file")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model_args = ModelArguments(model_name_or_path=args.model_name_or_path, gguf_file=args.gguf_file)
    model, tokenizer = load_model_and_tokenizer(model_args, seed=0)
    model.config.gguf_file = None  # the folder is plain safetensors now
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {args.model_name_or_path} ({args.gguf_file or 'safetensors'}) to {args.out}")


if __name__ == "__main__":
    main()
