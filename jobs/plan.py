"""``twodrl plan CONFIG --nodes N --gpus-per-node G --gpu-memory-gb M``: where every actor
of a run goes and how much memory each GPU needs, before anything is started.

Exit status: 0 when the run fits, 1 when it does not (the reasons are printed, naming
the actor and the config field to change), 2 for a config or model that cannot be read.
"""

from __future__ import annotations

import argparse
import sys

from twodrl.config import ConfigError, load_config
from twodrl.planner import Cluster, PlanError, PlanOptions, plan


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--nodes", type=int, required=True, help="GPU nodes in the cluster")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GiB (A100-80GB: 80)")
    p.add_argument("--cpus-per-node", type=float, default=None, help="check CPU slots too (default: not checked)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as for `twodrl run` (repeatable)")
    p.add_argument("--overhead-gb", type=float, default=PlanOptions.overhead_gb,
                   help="fixed runtime memory per GPU process: CUDA context, NCCL, fragmentation (default %(default)s)")
    p.add_argument("--activation-gb", type=float, default=None,
                   help="measured learner activation memory per GPU; default: estimated from the model shape")
    return p


def main(argv: list[str] | None = None, prog: str = "twodrl plan") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.cpus_per_node)
        result = plan(
            cfg,
            cluster,
            PlanOptions(overhead_gb=args.overhead_gb, activation_gb=args.activation_gb),
            config_name=args.config,
        )
    except (ConfigError, PlanError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.format())
    if not result.fits:
        # The reasons are in the plan above; stderr names them too, for scripts and CI logs.
        print(f"error: {args.config} does not fit on {args.nodes} node(s) × {args.gpus_per_node} GPU(s) × "
              f"{args.gpu_memory_gb:g} GiB:", file=sys.stderr)
        for problem in result.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m jobs.plan"))
