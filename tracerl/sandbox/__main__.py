"""Manual use: ``python -m tracerl.sandbox --judge <parent pid> < job.json`` runs one judge."""

import sys

from .judge import _judge_main

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--judge":
        sys.exit(_judge_main(sys.argv[2:]))
    print("usage: python -m tracerl.sandbox --judge <parent pid> < job.json  (internal; see "
          "tracerl.rewards.code)", file=sys.stderr)
    sys.exit(2)
