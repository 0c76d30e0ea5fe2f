"""The chaos scenario at scale: real daemon processes SIGKILLed at random while the emulator injects faults.

Prints the seed first and the run's table last; exits 1 when a promise broke (paid twice, a file lost, no
sidecar, neither delivered nor shown in doubt, a temp file left). ``--seed`` replays a run's randomness.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import quiet

from watcher.emulator.chaos import ChaosPlan, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="files in all (default 1000)")
    parser.add_argument("--copies", type=int, help="of which byte-identical copies (default: a fifth)")
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs of the daemon (default 50)")
    parser.add_argument("--rate", type=float, default=0.1, help="chaos fault probability per request (0.1)")
    parser.add_argument("--seed", type=int, help="replay this run's randomness (default: a new seed)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (inbox, output, log)")
    args = parser.parse_args()
    quiet()  # the emulator's own log lines; the daemons log to a file in the run folder
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    print(f"chaos seed {seed} (replay: --seed {seed})", flush=True)
    root = Path(tempfile.mkdtemp(prefix="watcher-chaos-"))
    plan = ChaosPlan(
        root=root,
        seed=seed,
        files=args.files,
        copies=args.files // 5 if args.copies is None else args.copies,
        kills=args.kills,
        rate=args.rate,
        settle_timeout=max(40.0, args.files * 0.3),
        retry_timeout=max(20.0, args.files * 0.1),
    )
    try:
        result = run_chaos(plan)
    finally:
        if args.keep:
            print(f"run folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(result.table())
    for problem in result.problems[:50]:
        print(f"PROBLEM {problem}")
    if len(result.problems) > 50:
        print(f"... and {len(result.problems) - 50} more")
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
