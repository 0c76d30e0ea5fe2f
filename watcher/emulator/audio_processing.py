"""The emulator's stand-in processing: deterministic, cheap, streamed, and clearly labelled as EMULATED.

- restored = an exact copy of the original;
- mastered = a gain-normalised copy: 16-bit PCM WAV scaled so its peak sits at -1 dBFS;
- stems = crude band splits: moving averages of growing length, so the bands (highest first) sum back
  to the source; stem ``i`` of a preset's name list gets band ``i``.

Only 16-bit PCM WAV is processed (with numpy, which the test and ``local`` extras bring); any other input,
or a run without numpy, gets byte copies. Output is always WAV: asked for FLAC or MP3, the emulator still
writes WAV and names the files ``.wav``. Nothing here is real restoration, mastering or separation.
"""

from __future__ import annotations

import importlib.util
import shutil
import wave
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# Stem names per documented preset, in the order the service is likely to use (our choice: the docs do
# not list them). Unknown presets are refused by the emulator with 422.
STEM_NAMES: dict[str, list[str]] = {
    "2_tracks": ["vocals", "accompaniment"],
    "4_tracks": ["vocals", "drums", "bass", "other"],
    "6_tracks": ["vocals", "drums", "bass", "guitar", "piano", "other"],
    "acapella": ["vocals"],
    "instrumental": ["instrumental"],
}
# Hostile or broken archives the emulator can serve instead of a clean one (ProcessingFaults.zip_attack).
ATTACKS = ("dotdot", "absolute", "symlink", "device", "oversized", "truncated")
PEAK_DBFS = -1.0
BLOCK_FRAMES = 1 << 16
NOTE = (
    "EMULATED OUTPUT from watcher's loopback emulator of the processing service (Neural Analog).\n"
    "restored = an exact copy of the original; mastered = peak-normalised to -1 dBFS;\n"
    "stems = crude band splits (moving averages) that sum back to their source.\n"
    "Every audio file is 16-bit PCM WAV named .wav, whatever format was asked for.\n"
    "Nothing here was restored, mastered or separated for real.\n"
)


def numpy_available() -> bool:
    return importlib.util.find_spec("numpy") is not None


def _pcm16(path: Path) -> wave._wave_params | None:
    """The WAV parameters when ``path`` is 16-bit PCM WAV we can process, else None."""
    if not numpy_available():
        return None
    try:
        with wave.open(str(path), "rb") as w:
            params = w.getparams()
    except (wave.Error, EOFError, OSError):
        return None
    return params if params.sampwidth == 2 and params.comptype == "NONE" else None


def _blocks(path: Path) -> Iterator[np.ndarray]:
    """The file's samples as int16 arrays of shape (frames, channels), a block at a time."""
    import numpy as np

    with wave.open(str(path), "rb") as w:
        ch = w.getnchannels()
        while data := w.readframes(BLOCK_FRAMES):
            yield np.frombuffer(data, dtype="<i2").reshape(-1, ch)


def _writer(path: Path, params: wave._wave_params) -> wave.Wave_write:
    w = wave.open(str(path), "wb")  # noqa: SIM115 - closed by the caller
    w.setnchannels(params.nchannels)
    w.setsampwidth(2)
    w.setframerate(params.framerate)
    return w


def _to_int16(x: Any) -> bytes:
    import numpy as np

    return bytes(np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes())


def restore(source: Path, dest: Path) -> None:
    """Emulated restoration: an exact copy."""
    shutil.copyfile(source, dest)


def master(source: Path, dest: Path) -> None:
    """Emulated mastering: scale so the peak sits at -1 dBFS (16-bit WAV); other files are copied."""
    params = _pcm16(source)
    if params is None:
        shutil.copyfile(source, dest)
        return
    peak = 0
    for block in _blocks(source):
        if block.size:
            peak = max(peak, int(abs(block.astype("i4")).max()))
    gain = (32767 * 10 ** (PEAK_DBFS / 20)) / peak if peak else 1.0
    w = _writer(dest, params)
    try:
        for block in _blocks(source):
            w.writeframes(_to_int16(block * gain))
    finally:
        w.close()


class _MovingAverage:
    """A causal moving average over ``width`` frames, carried across blocks."""

    def __init__(self, width: int, channels: int) -> None:
        import numpy as np

        self.width = width
        self.carry = np.zeros((width - 1, channels), dtype="f8")

    def __call__(self, block: np.ndarray) -> np.ndarray:
        import numpy as np

        ext = np.concatenate([self.carry, block.astype("f8")])
        cs = np.concatenate([np.zeros((1, ext.shape[1])), np.cumsum(ext, axis=0)])
        out: np.ndarray = (cs[self.width :] - cs[: -self.width]) / self.width
        self.carry = ext[len(ext) - (self.width - 1) :] if self.width > 1 else ext[:0]
        return out


def split(source: Path, dest_dir: Path, preset: str) -> list[Path]:
    """Emulated separation: one ``<name>.wav`` per stem of ``preset`` (copies when not 16-bit WAV)."""
    names = STEM_NAMES[preset]
    dest_dir.mkdir(parents=True, exist_ok=True)
    outs = [dest_dir / f"{name}.wav" for name in names]
    params = _pcm16(source)
    if params is None:
        for out in outs:
            shutil.copyfile(source, out)
        return outs
    # Band i = average(4**i) - average(4**(i+1)); the last band is the longest average. They sum to x.
    averages = [_MovingAverage(4**i, params.nchannels) for i in range(1, len(names))]
    writers = [_writer(out, params) for out in outs]
    try:
        for block in _blocks(source):
            levels = [block.astype("f8"), *(avg(block) for avg in averages)]
            for i, w in enumerate(writers):
                band = levels[i] - levels[i + 1] if i + 1 < len(levels) else levels[i]
                w.writeframes(_to_int16(band))
    finally:
        for w in writers:
            w.close()
    return outs


def archive_note(asked: Mapping[str, str]) -> str:
    """The EMULATED.txt of a zip: what it is, and which asked-for formats were written as WAV instead."""
    other = {v: f for v, f in asked.items() if f.lower() not in ("wav", "wave")}
    lines = [f"{v}: {f} was asked for; this is WAV (the emulator writes WAV only)\n" for v, f in sorted(other.items())]
    return NOTE + "".join(lines)


def build_zip(
    zip_path: Path, entries: Sequence[tuple[str, Path]], note: str, attack: str | None = None, bomb_bytes: int = 0
) -> None:
    """Write the archive: ``EMULATED.txt``, then each (name, file) stored, then the ``attack`` if any."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("EMULATED.txt", note, zipfile.ZIP_DEFLATED)
        for arcname, path in entries:
            zf.write(path, arcname)
        if attack == "dotdot":
            zf.writestr("../escaped.wav", b"RIFF")
        elif attack == "absolute":
            zf.writestr("/srv/absolute.wav", b"RIFF")
        elif attack in ("symlink", "device"):
            info = zipfile.ZipInfo("link.wav" if attack == "symlink" else "device.wav")
            info.external_attr = (0o120777 if attack == "symlink" else 0o020644) << 16
            zf.writestr(info, "/etc/passwd")
        elif attack == "oversized":  # a bomb: megabytes of zeros deflate to a few kilobytes
            info = zipfile.ZipInfo("huge.wav")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=bomb_bytes >= 1 << 31) as out:
                block = bytes(1 << 20)
                for start in range(0, bomb_bytes, len(block)):
                    out.write(block[: min(len(block), bomb_bytes - start)])
    if attack == "truncated":
        with zip_path.open("r+b") as fh:
            fh.truncate(zip_path.stat().st_size // 2)
