"""Command line: parse arguments and call a workflow; nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from budgetlm import __version__
from budgetlm.config import (
    FinetuneConfig,
    FinetuneRunConfig,
    RUN_SECTIONS,
    RunConfig,
    add_section_flags,
    resolve,
    to_toml,
)
from budgetlm.errors import UserError

from budgetlm.report import default_out as _default_out

SECTIONS = RUN_SECTIONS


DIVERGED_EXIT = 3
# Commands whose steps free and reallocate the same large tensors (train/runtime.keep_freed_memory); eval and
# predict stream text and measured a peak 2-5x higher with the setting (400 KB of text: 2.37 → 0.47 GB without it)
KEEPS_FREED_MEMORY = {"pretrain", "plan", "finetune", "compare", "tune", "generate"}  # plan: its speed probe


def _exit_code(summary: dict) -> int:
    """A run that diverged kept its best weights but did not finish: scripts should notice."""
    return DIVERGED_EXIT if summary.get("stop_reason") == "diverged" else 0


def _pretrain(args: argparse.Namespace) -> int:
    from budgetlm.workflows import pretrain

    cfg = resolve(RunConfig, SECTIONS, args.config, vars(args))
    if args.print_config:
        print(to_toml(cfg))
        return 0
    out = Path(args.out) if args.out else _default_out()
    return _exit_code(pretrain.run(cfg, out, quiet=args.quiet, count_startup=args.from_command_line))


def _plan(args: argparse.Namespace) -> int:
    from budgetlm.workflows import plan

    cfg = resolve(RunConfig, SECTIONS, args.config, vars(args))
    plan.run(cfg, as_json=args.json)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from budgetlm.workflows import generate

    generate.run(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k or None, top_p=args.top_p, seed=args.seed, device=args.device,
                 precision=args.precision)
    return 0


def _fill(args: argparse.Namespace) -> int:
    from budgetlm.workflows import fill

    fill.run(args.model, args.text, top_k=args.top_k, device=args.device)
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
                         header=args.header, spec=args.augment, seed=args.seed, synonyms=args.synonyms)
    print(json.dumps(result, indent=2))
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from budgetlm.workflows import baseline

    result = baseline.run(args.data, args.val, text_column=args.text_column, label_column=args.label_column,
                          header=args.header, val_fraction=args.val_fraction, seed=args.seed, out=Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from budgetlm.workflows import ensemble

    cfg = resolve(FinetuneRunConfig, {"finetune": FinetuneConfig}, args.config, vars(args))
    if args.print_config:
        print(to_toml(cfg))
        return 0
    out = Path(args.out) if args.out else _default_out()
    return _exit_code(ensemble.run(cfg.finetune, out, quiet=args.quiet))


def _predict(args: argparse.Namespace) -> int:
    from budgetlm.workflows import predict

    predict.run(args.model, texts=args.text, data=args.data, text_column=args.text_column, header=args.header,
                out=args.out, device=args.device, threads=args.threads)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from budgetlm.workflows import compare

    cfg = resolve(RunConfig, SECTIONS, args.config, vars(args))
    variants = compare.variants(cfg, vary=args.vary, sweep=args.sweep)
    compare.run(cfg, variants, Path(args.out) if args.out else _default_out(), metric=args.metric)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from budgetlm.workflows import tune

    cfg, table = tune.load_config(args.config, vars(args), SECTIONS)
    space = tune.parse_space(table if table is not None else tune.DEFAULT_SPACE, cfg)
    tune.run(cfg, space, Path(args.out) if args.out else _default_out(), total_budget=args.total_budget,
             trial_budget=args.trial_budget, trials=args.trials)
    return 0


def _export(args: argparse.Namespace) -> int:
    from budgetlm.workflows import export

    export.run(args.model, Path(args.out), format=args.format)
    return 0


def _import(args: argparse.Namespace) -> int:
    from budgetlm.workflows import import_

    import_.run(args.source, Path(args.out))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from budgetlm.workflows import runs

    runs.run(args.folder, as_json=args.json)
    return 0


def _header_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-header", dest="header", action="store_false",
                        help="the CSV/TSV file has no header row: its columns are named by position "
                             "(--text-column 0 --label-column 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="budgetlm", description="Train the best language model a budget allows.")
    parser.add_argument("--version", action="version", version=f"budgetlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a GPT (or BERT, T5: --arch) on a text corpus within a budget",
                       description="Train a GPT, BERT or T5 on text within a budget; keeps the best weights.")
    p.add_argument("--config", help="TOML file with [data], [model] and [train] tables; flags override it")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    for name, cls in SECTIONS.items():
        add_section_flags(p, cls, name)
    p.set_defaults(func=_pretrain)

    pl = sub.add_parser("plan", help="show the model, batch and recipe pretrain would choose, without training",
                        description="Print the plan pretrain would follow for these settings and its reasons: "
                        "device, speed (measured or assumed), shape, tokens, batch, learning rate, regularizers and "
                        "the shapes weighed. Takes pretrain's options.")
    pl.add_argument("--config", help="TOML file with [data], [model] and [train] tables; flags override it")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (fields: docs/planner.md)")
    for name, cls in SECTIONS.items():
        add_section_flags(pl, cls, name)
    pl.set_defaults(func=_plan)

    g = sub.add_parser("generate", help="sample text from a trained model (a T5: fill the prompt's <extra_id_N> "
                                         "sentinels)")
    g.add_argument("--model", required=True, help="a run folder (model.safetensors, config.json, tokenizer.json)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set with this mass")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="weights' precision while decoding; auto: bf16 where the device multiplies it in hardware")
    g.set_defaults(func=_generate)

    f = sub.add_parser("fill", help="the likeliest tokens for each [MASK] of a text, from a --arch bert model")
    f.add_argument("--model", required=True, help="a run folder of pretrain --arch bert")
    f.add_argument("--text", required=True, help='text with [MASK] where tokens are to be predicted, e.g. '
                   '"the [MASK] sat"')
    f.add_argument("--top-k", type=int, default=5, help="predictions shown for each mask")
    f.add_argument("--device", default="auto")
    f.set_defaults(func=_fill)

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
    a.add_argument("--text-column", default=None,
                   help="column (or .jsonl field) holding the text (default: text, else the only text-like column)")
    a.add_argument("--label-column", default=None,
                   help="column (or .jsonl field) holding the label (default: label, else the only other column)")
    _header_flag(a)
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
    b.add_argument("--text-column", default=None,
                   help="column (or .jsonl field) holding the text (default: text, else the only text-like column)")
    b.add_argument("--label-column", default=None,
                   help="column (or .jsonl field) holding the label (default: label, else the only other column)")
    _header_flag(b)
    b.add_argument("--val-fraction", type=float, default=0.2, help="share held out when --val is not given")
    b.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    b.add_argument("--out", default=None, help="folder to write baseline.json into")
    b.set_defaults(func=_baseline)

    f = sub.add_parser("finetune", help="train a text classifier within a budget",
                       description="Fine-tune a budgetlm GPT, a Hugging Face encoder (hf:PATH) or a new GPT or LSTM "
                                   "(scratch) on labelled text; keeps the best weights.")
    f.add_argument("--config", help="TOML file with a [finetune] table; flags override it")
    f.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    f.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    add_section_flags(f, FinetuneConfig, "finetune")
    f.set_defaults(func=_finetune)

    r = sub.add_parser("predict", help="labels and probabilities from a fine-tuned classifier",
                       description="Classify texts with a budgetlm finetune folder: one JSON object per text, "
                                   "in input order, with label and probs.")
    r.add_argument("--model", required=True, help="the --out folder of budgetlm finetune")
    r.add_argument("--text", nargs="+", action="extend", help="text(s) to classify")
    r.add_argument("--data", help="a .txt file (one text per line) or a .tsv/.csv/.jsonl/.parquet table")
    r.add_argument("--text-column", default=None, help="the table's text column (default: the training data's)")
    _header_flag(r)
    r.add_argument("--out", help="write the JSON lines to this file instead of stdout")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=int, default=None, help="CPU threads (default: the machine's cores)")
    r.set_defaults(func=_predict)

    c = sub.add_parser("compare", help="train variants of a config on the same data and budget, side by side",
                       description="Run each variant with the same data and budget, one after another; write "
                       "compare.json, compare.md and compare.png to --out.")
    c.add_argument("--vary", action="append", metavar="KEY=V1,V2,...",
                   help="values of a config key to compare, e.g. optim=adamw,muon; repeat it for a grid")
    c.add_argument("--sweep", metavar="FILE.toml",
                   help="variants as [[variant]] tables: name = \"...\" plus config keys, flat or under "
                   "[variant.data], [variant.model], [variant.train]")
    c.add_argument("--config", help="TOML file with [data], [model] and [train] tables: the base of every variant; "
                   "flags override it")
    c.add_argument("--out", help="folder for the variants' runs and the reports (default: runs/<timestamp>)")
    c.add_argument("--metric", choices=("val_loss", "val_bpb"), default=None,
                   help="rank by this validation figure (default: val_bpb, or val_loss where no variant predicts the "
                   "next token); needed to rank variants of different --arch objectives together")
    for name, cls in SECTIONS.items():
        add_section_flags(c, cls, name)
    c.set_defaults(func=_compare)

    t = sub.add_parser("tune", help="search hyperparameters with Optuna within a total budget",
                       description="TPE search with median pruning; each trial in OUT/trial-NNN; writes best.toml, "
                       "trials.json, trials.md and tune.png to --out.")
    t.add_argument("--total-budget", help="wall-clock time of the whole search, e.g. 30m; no trial starts that "
                   "would not fit")
    t.add_argument("--trial-budget", help="wall-clock budget of each trial, e.g. 60s (default: --budget)")
    t.add_argument("--trials", type=int, help="at most this many trials")
    t.add_argument("--config", help="TOML file with [data], [model], [train] and a [tune] search space "
                   "(default space: optim, lr_factor, warmup, weight_decay, batch_tokens); flags override it")
    t.add_argument("--out", help="folder for the trials and the reports (default: runs/<timestamp>)")
    for name, cls in SECTIONS.items():
        add_section_flags(t, cls, name)
    t.set_defaults(func=_tune)

    x = sub.add_parser("export", help="write a trained model as a Hugging Face transformers folder",
                       description="Write a budgetlm model as a transformers folder: a GPT as Qwen3 (SwiGLU MLP) or "
                                   "Apertus (ReLU²), loaded without custom code; a BERT, a T5 and a GPT with Canon "
                                   "layers or a softcap with budgetlm's modeling code (trust_remote_code=True; "
                                   "docs/export.md).")
    x.add_argument("--model", required=True, help="a run folder (model.safetensors, config.json, tokenizer.json)")
    x.add_argument("--format", default="hf", choices=("hf",), help="hf: Hugging Face transformers")
    x.add_argument("--out", required=True, help="folder to write")
    x.set_defaults(func=_export)

    m = sub.add_parser("import", help="read a Hugging Face transformers folder back as a budgetlm model",
                       description="Turn a transformers folder of a family budgetlm exports (qwen3, apertus, or "
                                   "budgetlm's custom code) into a budgetlm model folder for generate, eval and "
                                   "finetune --model.")
    m.add_argument("--from", dest="source", required=True, metavar="hf:PATH", help="hf: and the folder")
    m.add_argument("--out", required=True, help="model folder to write")
    m.set_defaults(func=_import)


    n = sub.add_parser("runs", help="list the runs under a folder, best first",
                       description="A table of the runs under DIR (name, date, architecture, size, budget, "
                                   "metric, stop reason), sorted by their validation metric.")
    n.add_argument("folder", metavar="DIR", nargs="?", default="runs", help="where to look (default: runs/)")
    n.add_argument("--json", action="store_true", help="print the rows as JSON")
    n.set_defaults(func=_runs)

    for sp in (p, pl, g, e, a, b, f, r, c, t, x, m, n):
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.from_command_line = argv is None  # this process is the command: its start-up counts in the budget
    from budgetlm.train.runtime import keep_freed_memory

    if args.command in KEEPS_FREED_MEMORY:  # process-wide: the command line's own process, not an importer's
        keep_freed_memory()
    try:
        if "WORLD_SIZE" in os.environ and args.command not in ("pretrain", "finetune"):  # N copies, one --out
            raise UserError(f"`budgetlm {args.command}` runs in one process; only pretrain and finetune run under "
                            "torchrun (docs/distributed.md)")
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
