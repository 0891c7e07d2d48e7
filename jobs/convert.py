"""``twodrl convert --from FORMAT IN OUT``: write another preference layout as
HelpSteer-2D records (JSONL, or Parquet when OUT ends in .parquet). The readers are the
ones behind the offline job's ``data.format`` (:mod:`twodrl.convert`); the first bad row
stops the conversion with its file, line and field."""

from __future__ import annotations

import argparse
import sys

from twodrl.convert import FORMATS


def main(argv: list[str] | None = None, prog: str = "twodrl convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--from", dest="fmt", choices=FORMATS, default="auto",
                        help="input layout (annotate = the output of twodrl annotate; auto: from the first row)")
    parser.add_argument("input", metavar="IN", help="JSONL / Parquet file, saved datasets directory or hub name")
    parser.add_argument("output", metavar="OUT", help="output file (.jsonl or .parquet)")
    parser.add_argument("--split", default="train", help="split of a datasets directory or hub dataset")
    args = parser.parse_args(argv)

    from twodrl.convert import load_preference_data
    from twodrl.data import DataError, write_jsonl, write_parquet

    try:
        records = load_preference_data(args.input, args.fmt, args.split).records
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write = write_parquet if args.output.lower().endswith((".parquet", ".pq")) else write_jsonl
    n = write(records, args.output)
    print(f"[twodrl] wrote {n} record(s) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m jobs.convert"))
