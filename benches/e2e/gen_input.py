"""Writes the input of benches/e2e/run.sh: deterministic JSON lines, one reading per line.

    python3 gen_input.py LINES OUT

Line i is device `dev-{i % 1000:04d}` (round robin over 1,000 devices) at event time
1,700,000,000,000 + i ms, with 8 float features f0..f7: a slow per-device sine plus noise from
a seeded generator, written with 4 decimals. The same LINES always give the same bytes.
"""

import math
import random
import sys

DEVICES = 1000
FEATURES = 8
START_MS = 1_700_000_000_000


def main() -> int:
    lines, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(17)
    base = [[rng.uniform(-5.0, 50.0) for _ in range(FEATURES)] for _ in range(DEVICES)]
    names = [f"dev-{d:04d}" for d in range(DEVICES)]
    gauss = rng.gauss
    with open(out, "w", buffering=1 << 20) as fh:
        for i in range(lines):
            d = i % DEVICES
            phase = math.sin((i // DEVICES) / 50.0)
            b = base[d]
            values = ",".join(
                f'"f{f}":{b[f] + phase * (f + 1) + gauss(0.0, 0.5):.4f}' for f in range(FEATURES)
            )
            fh.write(f'{{"device":"{names[d]}","ts":{START_MS + i},{values}}}\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
