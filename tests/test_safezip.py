"""Safe extraction of zips from the network: every trick refused, nothing left behind, CRCs checked."""

from __future__ import annotations

import contextlib
import hashlib
import random
import stat
import threading
import warnings
import zipfile
from pathlib import Path

import pytest

from watcher.safezip import BadArchive, SizeBound, extract_zip, size_bound

LIMITS = {"max_total_bytes": 1 << 20, "max_entries": 10}


def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are one of the tests
        for name, data in entries:
            zf.writestr(name, data)
    return path


def leftovers(dest: Path) -> list[Path]:
    return list(dest.iterdir()) if dest.exists() else []


def test_good_zip_is_extracted_with_hashes(tmp_path):
    """Regular files and folders come out whole, with sizes and sha256 computed while extracting."""
    z = make_zip(tmp_path / "ok.zip", [("stems/", b""), ("a.wav", b"RIFF1234"), ("stems/b.wav", b"x" * 5000)])
    out = extract_zip(z, tmp_path / "dest", **LIMITS)
    assert out.root.parent == tmp_path / "dest" and out.root.name.startswith(".watcher-tmp-")
    assert {f.path: f.size for f in out.files} == {"a.wav": 8, "stems/b.wav": 5000}
    assert {f.path: f.sha256 for f in out.files}["a.wav"] == hashlib.sha256(b"RIFF1234").hexdigest()
    assert (out.root / "stems" / "b.wav").read_bytes() == b"x" * 5000
    assert out.total_bytes == 5008 and list((tmp_path / "dest").iterdir()) == [out.root]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.wav", "'..'"),
        ("a/../../evil.wav", "'..'"),
        ("/etc/evil.wav", "absolute"),
        ("C:/evil.wav", "absolute"),
        ("..\\evil.wav", "'..'"),
    ],
)
def test_escaping_names_are_refused(tmp_path, name, reason):
    """Entries that would land outside the destination are refused and nothing is kept."""
    z = make_zip(tmp_path / "bad.zip", [("fine.wav", b"ok"), (name, b"bad")])
    dest = tmp_path / "dest"
    with pytest.raises(BadArchive, match=reason) as err:
        extract_zip(z, dest, **LIMITS)
    assert "bad.zip" in str(err.value)
    assert leftovers(dest) == []


@pytest.mark.parametrize(
    ("mode", "what"), [(0o120777, "a link"), (0o020644, "a special file"), (0o010644, "a special file")]
)
def test_links_and_devices_are_refused(tmp_path, mode, what):
    """Symlinks, character devices and FIFOs inside a zip are never created."""
    info = zipfile.ZipInfo("x.wav")
    info.external_attr = mode << 16
    z = make_zip(tmp_path / "l.zip", [(info, b"/etc/passwd")])
    with pytest.raises(BadArchive, match=what):
        extract_zip(z, tmp_path / "dest", **LIMITS)
    assert leftovers(tmp_path / "dest") == []


def test_size_and_count_limits(tmp_path):
    """Too many entries, or more bytes than allowed (declared or real), are refused."""
    many = make_zip(tmp_path / "many.zip", [(f"{i}.wav", b"x") for i in range(11)])
    with pytest.raises(BadArchive, match="11 entries"):
        extract_zip(many, tmp_path / "d1", **LIMITS)
    bomb = make_zip(tmp_path / "bomb.zip", [("big.wav", b"\0" * (2 << 20))])
    assert bomb.stat().st_size < 100_000
    with pytest.raises(BadArchive, match="more than the limit"):
        extract_zip(bomb, tmp_path / "d2", **LIMITS)
    assert leftovers(tmp_path / "d1") == [] and leftovers(tmp_path / "d2") == []


def test_lying_header_is_caught_while_extracting(tmp_path):
    """A header that understates the size does not get past the byte count."""
    z = make_zip(tmp_path / "lie.zip", [("big.wav", b"\0" * (2 << 20))])
    raw = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zf:
        info = zf.infolist()[0]
    # Patch the declared uncompressed size in the central directory to 10 bytes.
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    z.write_bytes(bytes(raw))
    assert info.file_size == 2 << 20
    with pytest.raises(BadArchive):
        extract_zip(z, tmp_path / "dest", **LIMITS)
    assert leftovers(tmp_path / "dest") == []


def test_truncated_and_corrupted_zips(tmp_path):
    """A cut-off download and a flipped byte (CRC mismatch) are refused cleanly."""
    z = make_zip(tmp_path / "t.zip", [("a.wav", b"abc" * 10000)])
    data = z.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadArchive, match="not a zip file"):
        extract_zip(tmp_path / "cut.zip", tmp_path / "d1", **LIMITS)
    stored = tmp_path / "s.zip"
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.wav", b"abcdefgh" * 100)
    raw = bytearray(stored.read_bytes())
    raw[raw.find(b"abcdefgh") + 3] ^= 0xFF
    stored.write_bytes(bytes(raw))
    with pytest.raises(BadArchive, match="CRC"):
        extract_zip(stored, tmp_path / "d2", **LIMITS)
    assert leftovers(tmp_path / "d1") == [] and leftovers(tmp_path / "d2") == []


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([("a.wav", b"1"), ("a.wav", b"2")], "a duplicate name"),
        ([("A.wav", b"1"), ("a.wav", b"2")], "a duplicate name"),
        ([("x", b"file"), ("x/y.wav", b"2")], "which is a file"),
        ([("bad\x01name.wav", b"1")], "control character"),
        ([("./", b"")], "empty path"),
    ],
)
def test_ambiguous_names_are_refused(tmp_path, entries, reason):
    """Names that would overwrite each other, clash with a file, or cannot be written are refused."""
    z = make_zip(tmp_path / "n.zip", entries)
    with pytest.raises(BadArchive, match=reason):
        extract_zip(z, tmp_path / "dest", **LIMITS)
    assert leftovers(tmp_path / "dest") == []


def test_encrypted_and_windows_link_entries_are_refused(tmp_path):
    """An entry flagged encrypted, or marked a Windows reparse point (a link), is never extracted."""
    enc = make_zip(tmp_path / "enc.zip", [("secret.wav", b"data")])
    raw = bytearray(enc.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # flag bits, local and central
        raw[raw.find(signature) + offset] |= 0x1
    enc.write_bytes(bytes(raw))
    link = zipfile.ZipInfo("win.wav")
    link.create_system, link.external_attr = 0, 0x400
    for z, reason in [(enc, "encrypted"), (make_zip(tmp_path / "l.zip", [(link, b"C:/target")]), "a link")]:
        with pytest.raises(BadArchive, match=reason):
            extract_zip(z, tmp_path / "dest", **LIMITS)
    assert leftovers(tmp_path / "dest") == []


def test_checks_run_before_anything_is_written(tmp_path):
    """A bad entry at the end of the zip refuses it before the good entries in front are extracted."""
    good = [(f"{i}.wav", b"x" * 1000) for i in range(5)]
    z = make_zip(tmp_path / "late.zip", [*good, ("../late.wav", b"bad")])
    dest = tmp_path / "dest"
    with pytest.raises(BadArchive, match=r"'\.\./late\.wav'"):
        extract_zip(z, dest, **LIMITS)
    assert leftovers(dest) == [] and not (tmp_path / "late.wav").exists()


# -- bounds derived from the source -------------------------------------------------------------------------


def largest_file_while(dest: Path, action) -> tuple[int, BaseException | None]:
    """Run ``action`` while a thread samples the largest regular file under ``dest``; (largest, raised)."""
    largest = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal largest
        while not stop.is_set():
            for p in dest.rglob("*") if dest.exists() else ():
                with contextlib.suppress(OSError):
                    if p.is_file():
                        largest = max(largest, p.stat().st_size)
            stop.wait(0.001)

    watcher_thread = threading.Thread(target=sample, daemon=True)
    watcher_thread.start()
    raised: BaseException | None = None
    try:
        action()
    except BaseException as exc:  # reported to the caller
        raised = exc
    finally:
        stop.set()
        watcher_thread.join()
    return largest, raised


@pytest.fixture(scope="module")
def two_gib_bomb(tmp_path_factory) -> Path:
    """A zip holding one 2 GiB entry of zeros (a few MiB on disk), plus a real-looking small entry."""
    z = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("vocals.wav", b"RIFF" + bytes(1000))
        info = zipfile.ZipInfo("huge.wav")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as out:
            block = bytes(8 << 20)
            for _ in range((2 << 30) // len(block)):
                out.write(block)
    return z


def test_size_bound_follows_the_source():
    """192 kHz x 4 bytes x channels x seconds x 1.5 + 1 MiB per file, x files, never above the cap."""
    b = size_bound(3.0, 2, 4, 20 << 30)
    assert b.per_file == 192_000 * 4 * 2 * 3 * 3 // 2 + (1 << 20)
    assert b.total == b.per_file * 4 + (1 << 20)
    assert size_bound(3.0, 1, 1, 20 << 30).per_file == b.per_file  # mono may come back stereo
    assert size_bound(3.0, None, 1, 20 << 30).per_file == 192_000 * 4 * 8 * 3 * 3 // 2 + (1 << 20)
    assert size_bound(None, 2, 4, 12345) == SizeBound(12345, 12345)
    assert size_bound(3600.0, 2, 4, 1 << 30).total == 1 << 30


def test_two_gib_of_zeros_for_a_three_second_source_is_refused(tmp_path, two_gib_bomb):
    """The bomb is refused on its declared size before anything is written; the error names all it needs."""
    dest = tmp_path / "dest"
    bound = size_bound(3.0, 2, 2, 20 << 30)
    largest, raised = largest_file_while(
        dest, lambda: extract_zip(two_gib_bomb, dest, max_total_bytes=20 << 30, max_entries=10, bound=bound)
    )
    print(f"largest file written while refusing a 2 GiB entry: {largest} bytes")
    assert isinstance(raised, BadArchive), raised
    message = str(raised)
    for part in ("bomb.zip", "'huge.wav'", str(2 << 30), f"{bound.per_file}-byte bound", "3.0 s", "2-channel"):
        assert part in message, (part, message)
    assert largest < 1 << 30 and largest <= bound.per_file
    assert leftovers(dest) == []


def test_bomb_without_a_bound_is_refused_by_its_ratio(tmp_path, two_gib_bomb):
    """With the source's duration unknown, the compression ratio alone refuses a run of zeros."""
    with pytest.raises(BadArchive, match=r"'huge\.wav'.*compressed \d+:1"):
        extract_zip(two_gib_bomb, tmp_path / "dest", max_total_bytes=20 << 30, max_entries=10)
    assert leftovers(tmp_path / "dest") == []


def test_audio_within_the_bound_is_extracted_and_the_total_is_bounded(tmp_path):
    """Entries that fit the per-file bound come out; more of them than the request justifies do not."""
    seed = 7
    print(f"random seed {seed}")
    noise = random.Random(seed).randbytes(200_000)  # incompressible, like audio
    z = make_zip(tmp_path / "ok.zip", [("a.wav", noise), ("b.wav", noise)])
    bound = size_bound(0.05, 2, 2, 20 << 30)  # 0.05 s: 115 kB + 1 MiB per file
    out = extract_zip(z, tmp_path / "d1", max_total_bytes=20 << 30, max_entries=10, bound=bound)
    assert {f.path: f.size for f in out.files} == {"a.wav": 200_000, "b.wav": 200_000}
    tight = SizeBound(per_file=300_000, total=350_000, duration=0.05, channels=2)
    with pytest.raises(BadArchive, match=r"400000 bytes uncompressed in all, more than the limit \(350000-byte bound"):
        extract_zip(z, tmp_path / "d2", max_total_bytes=20 << 30, max_entries=10, bound=tight)
    assert leftovers(tmp_path / "d2") == []


def test_extracted_files_stay_private_until_delivered(tmp_path):
    """Entries are written 0600 inside the private temp folder; delivery gives them their final mode."""
    z = make_zip(tmp_path / "ok.zip", [("a.wav", b"RIFF1234"), ("stems/b.wav", b"x" * 10)])
    out = extract_zip(z, tmp_path / "dest", **LIMITS)
    assert stat.S_IMODE(out.root.stat().st_mode) == 0o700
    assert {stat.S_IMODE((out.root / f.path).stat().st_mode) for f in out.files} == {0o600}
