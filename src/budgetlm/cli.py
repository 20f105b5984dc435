"""Command line: parse arguments and call a workflow; nothing else."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from budgetlm import __version__
from budgetlm.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    add_section_flags,
    resolve,
    to_toml,
)
from budgetlm.errors import UserError

SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


def _default_out() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def _pretrain(args: argparse.Namespace) -> int:
    from budgetlm.workflows import pretrain

    cfg = resolve(RunConfig, SECTIONS, args.config, vars(args))
    if args.print_config:
        print(to_toml(cfg))
        return 0
    out = Path(args.out) if args.out else _default_out()
    pretrain.run(cfg, out, quiet=args.quiet)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from budgetlm.workflows import generate

    generate.run(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, device=args.device)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from budgetlm.workflows import evaluate

    result = evaluate.run(args.model, args.data, text_field=args.text_field, text_column=args.text_column,
                          device=args.device)
    print(json.dumps(result, indent=2))
    return 0


def _augment(args: argparse.Namespace) -> int:
    from budgetlm.workflows import augment

    result = augment.run(args.input, args.output, text_column=args.text_column, label_column=args.label_column,
                         spec=args.augment, seed=args.seed, synonyms=args.synonyms)
    print(json.dumps(result, indent=2))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from budgetlm.workflows import baseline

    result = baseline.run(args.data, args.val, text_column=args.text_column, label_column=args.label_column,
                          val_fraction=args.val_fraction, seed=args.seed, out=Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlm", description="Train the best language model a budget allows.")
    parser.add_argument("--version", action="version", version=f"budgetlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a GPT on a text corpus within a budget",
                       description="Train a GPT on text within a budget; keeps the best weights.")
    p.add_argument("--config", help="TOML file with [data], [model] and [train] tables; flags override it")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    for name, cls in SECTIONS.items():
        add_section_flags(p, cls, name)
    p.set_defaults(func=_pretrain)

    g = sub.add_parser("generate", help="sample text from a trained model")
    g.add_argument("--model", required=True, help="a run folder (model.safetensors, config.json, tokenizer.json)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="loss, bits per byte and perplexity of a model on text")
    e.add_argument("--model", required=True, help="a run folder")
    e.add_argument("--data", required=True, nargs="+", action="extend", help="text files, folders, globs or tables")
    e.add_argument("--text-field", default="text")
    e.add_argument("--text-column", default=None)
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_eval)

    a = sub.add_parser("augment", help="add EDA copies (synonyms, insertions, swaps, deletions) to labelled data",
                       description="Write IN plus augmented copies of each row to OUT, in the same format. "
                                   "Augment the training split only.")
    a.add_argument("input", metavar="IN", help="labelled table: .tsv, .csv, .jsonl or .parquet")
    a.add_argument("output", metavar="OUT", help="where to write the augmented table (same format as IN)")
    a.add_argument("--text-column", default="sentence", help="column (or .jsonl field) holding the text")
    a.add_argument("--label-column", default="label", help="column (or .jsonl field) holding the label")
    a.add_argument("--augment", default="sr=0.1,ri=0.1,rs=0.1,rd=0.1,n=4",
                   help="rates of synonym replacement, random insertion, swap and deletion, and copies per row "
                        "(operations left out are off; default: %(default)s)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--synonyms", default=None,
                   help="a WordNet database folder or a JSON file mapping words to synonym lists "
                        "(default: NLTK's WordNet, else /usr/share/wordnet from apt-get install wordnet-base)")
    a.set_defaults(func=_augment)

    b = sub.add_parser("baseline", help="TF-IDF + logistic regression accuracy on labelled data",
                       description="Fit TF-IDF (word 1-2 grams) + logistic regression; print validation "
                                   "accuracy and macro-F1.")
    b.add_argument("--data", required=True, help="training table: .tsv, .csv, .jsonl or .parquet")
    b.add_argument("--val", default=None, help="validation table (default: a stratified share of --data)")
    b.add_argument("--text-column", default="sentence", help="column (or .jsonl field) holding the text")
    b.add_argument("--label-column", default="label", help="column (or .jsonl field) holding the label")
    b.add_argument("--val-fraction", type=float, default=0.2, help="share held out when --val is not given")
    b.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    b.add_argument("--out", default=None, help="folder to write baseline.json into")
    b.set_defaults(func=_baseline)

    for sp in (p, g, e, a, b):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen: one line, the traceback only on request
        if getattr(args, "debug", False):
            raise
        print(f"error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
