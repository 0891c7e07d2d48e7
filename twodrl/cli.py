"""``twodrl`` command line: one entry, subcommands implemented in :mod:`jobs`.

The jobs are imported only when their subcommand runs, so ``twodrl --help`` stays
fast and the pure library never imports Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module in jobs/, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("jobs.online", "run the online iterative alignment job (2D-DPO, APPO, DPA-RSF, baselines)"),
    "train": ("jobs.train", "train the policy offline on a preference dataset (2D-DPO, DPO-family losses)"),
    "convert": ("jobs.convert", "convert HelpSteer2 / TRL preference / UltraFeedback data to HelpSteer-2D records"),
    "train-rm": ("jobs.train_rm", "train the 2D segment reward model"),
    "eval-rm": ("jobs.eval_rm", "evaluate the 2D reward model per aspect"),
    "eval": ("jobs.eval", "judge a policy checkpoint per aspect and against a baseline (win rate)"),
    "annotate": ("jobs.annotate", "annotate preference pairs with an LLM judge (OpenAI API)"),
    "serve-judge": ("jobs.serve_judge", "serve the local rule-based judge (OpenAI-compatible HTTP)"),
    "plan": ("jobs.plan", "plan actor placement and per-GPU memory on a cluster"),
    "validate": ("jobs.validate", "validate a config or a HelpSteer-2D dataset without running"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="twodrl",
        description="Align LLMs with fine-grained (segment × aspect) preferences on Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        parser.error(f"unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[command][0])
    result = module.main(rest, prog=f"twodrl {command}")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
