"""Local analysis (key, bpm_degara, loudness-ebur128) of a generated stereo file: time and peak memory.

Each run happens in a fresh child process, which reports its own peak resident size (VmHWM, Linux). The
parent's ru_maxrss of children is not used: Linux carries a forking parent's peak across exec.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHILD = """
import json, sys
from watcher.local.essentia_models import analyze_file
out = analyze_file(sys.argv[1], ["key", "bpm_degara", "loudness-ebur128"], max_seconds=7200)
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({k: v["results"].get("bpm") or v["results"].get("key") or v["results"].get("integratedLoudness")
                  for k, v in out["results"].items()} | {"errors": out["errors"], "peak_kib": int(hwm)}))
"""


def main() -> None:
    import numpy as np

    from tests.audiogen import chord_progression, click_track, write_wav

    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0])
    args = parser.parse_args()
    for minutes in args.minutes:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = minutes * 60
            music = np.resize(chord_progression(), int(seconds * 44100))
            music = 0.6 * music + 0.4 * click_track(120, seconds)[: len(music)]
            stereo = np.stack([music, music * 0.8], axis=1)
            path = write_wav(Path(tmp) / "five.wav", stereo)
            del music, stereo
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
            elapsed = time.perf_counter() - started
            report = json.loads(proc.stdout)
            peak = report.pop("peak_kib") / 1024
            print(
                f"{minutes:g} min stereo 44.1 kHz WAV ({path.stat().st_size / 1e6:.0f} MB): {elapsed:.1f} s, "
                f"peak RSS {peak:.0f} MiB; results: {report}"
            )


if __name__ == "__main__":
    main()
