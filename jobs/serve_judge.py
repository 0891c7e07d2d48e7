"""``twodrl serve-judge``: the local rule-based judge over OpenAI-compatible HTTP.

    twodrl serve-judge [--host 127.0.0.1] [--port 8011] [--mode synthetic|generic] [--model NAME]
        [--fault-429 R] [--fault-500 R] [--fault-slow R] [--slow-s S]
        [--fault-malformed R] [--fault-wrong-count R] [--latency-s L]
        [--retry-after-s S] [--seed N]

Point any OpenAI client at ``http://HOST:PORT/v1`` (any API key). Fault rates are
per-request probabilities, for exercising clients against an unreliable judge.
``--mode generic`` rates any English text with crude surface rules
(:mod:`twodrl.annotation.generic_rules`): a stand-in for wiring tests on real
prompts, not a quality judge.
"""

from __future__ import annotations

import argparse
import sys

from twodrl.annotation.judge_server import MODES, Faults, JudgeServer, default_model


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve the rule-based judge (OpenAI chat-completions API).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8011, help="port (0: any free port)")
    p.add_argument(
        "--mode", choices=MODES, default="synthetic",
        help="rule set: synthetic (the embedded animal task, default) or generic "
             "(surface rules for any English text; a wiring stand-in, not a quality judge)",
    )
    p.add_argument(
        "--model", default=None,
        help=f"model name reported by /v1/models (default: {default_model('synthetic')}, "
             f"or {default_model('generic')} with --mode generic)",
    )
    p.add_argument("--fault-429", type=float, default=0.0, metavar="R", help="rate of 429 replies")
    p.add_argument("--fault-500", type=float, default=0.0, metavar="R", help="rate of 500 replies")
    p.add_argument("--fault-slow", type=float, default=0.0, metavar="R", help="rate of slow replies")
    p.add_argument("--slow-s", type=float, default=5.0, metavar="S", help="delay of a slow reply")
    p.add_argument("--fault-malformed", type=float, default=0.0, metavar="R", help="rate of malformed replies")
    p.add_argument("--fault-wrong-count", type=float, default=0.0, metavar="R", help="rate of wrong segment counts")
    p.add_argument("--latency-s", type=float, default=0.0, metavar="L", help="latency added to every reply")
    p.add_argument("--retry-after-s", type=float, default=1.0, metavar="S", help="Retry-After sent with 429s")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    return p


def main(argv: list[str], prog: str = "twodrl serve-judge") -> int:
    p = _parser(prog)
    args = p.parse_args(argv)
    try:
        faults = Faults(
            rate_429=args.fault_429, rate_500=args.fault_500, rate_slow=args.fault_slow,
            rate_malformed=args.fault_malformed, rate_wrong_count=args.fault_wrong_count,
            slow_s=args.slow_s, latency_s=args.latency_s, retry_after_s=args.retry_after_s,
        )
    except ValueError as e:
        p.error(str(e))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{prog}: warning: binding {args.host}: the judge is reachable from other machines", file=sys.stderr)
    server = JudgeServer(args.host, args.port, faults, args.seed, model=args.model, mode=args.mode)
    print(f"{prog}: serving {server.model} ({args.mode} rules) at {server.url} (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
