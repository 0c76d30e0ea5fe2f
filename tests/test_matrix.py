"""The bad-input matrix: one odd input per row, real files, the real emulator and a real daemon.

For every row: the daemon keeps serving (a good file dropped after the bad one completes), the other files
complete, the bad one ends as the row expects (done, or a clear error naming it in `watcher status --json`
or the log), and nothing is written outside the configured folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import API_KEY, make_settings, query, wait_for, write_silent_wav, write_tone
from watcher.config import ArchiveConfig, FolderConfig
from watcher.emulator import Emulator
from watcher.names import display, to_db

pytestmark = pytest.mark.timeout(120)
PKEY = "processing-key-matrix"


@dataclass
class Ctx:
    """One row's world: folders, the emulator, the captured log, and what the row made."""

    tmp: Path
    inbox: Path
    spare: Path  # a second watched folder, for good files when the inbox itself is the bad input
    out: Path
    emu: Emulator
    logs: list[dict[str, Any]]
    bad: list[str] = field(default_factory=list)  # paths as detection carries them (os.fsdecode)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)

    def mentions(self, path: str, levels: tuple[str, ...] = ("warning", "error")) -> list[dict[str, Any]]:
        """Log events at these levels that name ``path`` (as shown to people) in any field."""
        shown, name = display(path), display(os.path.basename(path))
        found = []
        for e in list(self.logs):
            if e.get("log_level") not in levels:
                continue
            text = " ".join(display(v) if isinstance(v, str) else repr(v) for v in e.values())
            if shown in text or name in text:
                found.append(e)
        return found

    def problem(self, path: str) -> list[dict[str, Any]]:
        """`watcher status --json` problems for ``path``."""
        return [p for p in self.status.get("problems", []) if p["path"] == display(path)]


@dataclass
class Row:
    """One bad input: how to make it, what the user should see, and the test's needs."""

    id: str
    make: Callable[[Ctx], None]
    expect: str  # "done": processed normally; "error": a clear error naming it; "skipped": reported, never work
    archive: bool = False
    root: bool = False
    good_in_spare: bool = False
    versions: tuple[str, ...] = ("original",)
    faults: dict[str, Any] = field(default_factory=dict)  # emulator.processing.faults to set before the bad file
    clear_faults_after: bool = True
    analysis_faults: dict[str, Any] = field(default_factory=dict)
    what_user_sees: str = ""
    core_gap: str = ""  # a known failure in code this test does not own: the row is a strict xfail until fixed


def _bytes_name(folder: Path, name: bytes, seconds: float = 0.3, freq: float = 523.0) -> str:
    tmp = folder / "writing.part"
    write_tone(tmp, seconds, freq=freq)
    path = os.path.join(os.fsencode(folder), name)
    os.rename(os.fsencode(tmp), path)
    return os.fsdecode(path)


def make_name(name: bytes) -> Callable[[Ctx], None]:
    def make(ctx: Ctx) -> None:
        ctx.bad.append(_bytes_name(ctx.inbox, name))

    return make


def make_symlink_loop(ctx: Ctx) -> None:
    os.symlink(ctx.inbox / "loop-b.wav", ctx.inbox / "loop-a.wav")
    os.symlink(ctx.inbox / "loop-a.wav", ctx.inbox / "loop-b.wav")
    ctx.bad += [str(ctx.inbox / "loop-a.wav"), str(ctx.inbox / "loop-b.wav")]


def make_link_outside(ctx: Ctx) -> None:
    target = ctx.tmp / "elsewhere" / "private.wav"  # created before the snapshot (see the test)
    os.symlink(target, ctx.inbox / "link-out.wav")
    ctx.bad.append(str(ctx.inbox / "link-out.wav"))


def make_fifo(ctx: Ctx) -> None:
    os.mkfifo(ctx.inbox / "pipe.wav")
    ctx.bad.append(str(ctx.inbox / "pipe.wav"))


def make_device(ctx: Ctx) -> None:
    os.mknod(ctx.inbox / "device.wav", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    ctx.bad.append(str(ctx.inbox / "device.wav"))


def make_while_uploading(change: str) -> Callable[[Ctx], None]:
    """A 4 MB file changed while the analysis upload reads it over a slow link."""

    def make(ctx: Ctx) -> None:
        ctx.emu.analysis.faults.read_delay = 0.1  # per 64 KiB: the upload takes ~6 s
        path = write_silent_wav(ctx.tmp / "staging" / f"{change}.wav", 4)
        os.rename(path, ctx.inbox / path.name)
        bad = str(ctx.inbox / path.name)
        ctx.bad.append(bad)
        wait_for(
            lambda: any(e.get("event") == "analyze.started" and e.get("path") == bad for e in ctx.logs),
            timeout=30,
            what="the upload to start",
        )
        if change == "deleted":
            os.unlink(bad)
        else:
            os.truncate(bad, 1 << 20)
        ctx.emu.analysis.faults.read_delay = 0.0

    return make


def make_share_vanishes(ctx: Ctx) -> None:
    """The watched folder is a tmpfs with files in it, unmounted while the daemon works on them."""
    for i in range(20):
        write_tone(ctx.inbox / f"on the share {i:02d}.wav", 0.2, freq=200 + 10 * i)
    ctx.bad.append(str(ctx.inbox))
    wait_for(lambda: any(e.get("event") == "file.settled" for e in ctx.logs), timeout=30, what="work on the share")
    subprocess.run(["umount", "-l", str(ctx.inbox)], check=True)


def make_big(ctx: Ctx) -> None:
    path = write_silent_wav(ctx.tmp / "staging" / "too big for the output.wav", 3)
    os.rename(path, ctx.inbox / path.name)
    ctx.bad.append(str(ctx.inbox / path.name))


def make_plain(name: str) -> Callable[[Ctx], None]:
    def make(ctx: Ctx) -> None:
        ctx.bad.append(str(write_tone(ctx.inbox / name, 0.3, freq=611)))

    return make


ROWS = [
    Row(
        "invalid-utf8-name",
        make_name(b"caf\xe9 (latin-1).wav"),
        "done",
        archive=True,
    ),
    Row(
        "newline-in-name",
        make_name(b"two\nlines.wav"),
        "done",
        archive=True,
    ),
    Row("name-of-255-bytes", make_name(b"n" * 251 + b".wav"), "error", what_user_sees="sidecar name too long"),
    Row("symlink-loop", make_symlink_loop, "skipped", what_user_sees="detect.check_failed: too many levels of links"),
    Row("symlink-to-outside-file", make_link_outside, "skipped", what_user_sees="detect.skipped: link leads outside"),
    Row("fifo", make_fifo, "skipped", what_user_sees="detect.skipped: not a regular file"),
    Row("device-node", make_device, "skipped", root=True, what_user_sees="detect.skipped: not a regular file"),
    Row("deleted-mid-upload", make_while_uploading("deleted"), "error", what_user_sees="file gone / changed"),
    Row("truncated-mid-upload", make_while_uploading("truncated"), "error", what_user_sees="file changed"),
    Row("share-vanishes-mid-scan", make_share_vanishes, "error", root=True, good_in_spare=True),
    Row("output-disk-full", make_big, "error", archive=True, root=True, what_user_sees="no space left"),
    Row(
        "upload-refused-422",
        make_plain("refuse me.wav"),
        "error",
        archive=True,
        faults={"reject_uploads": {"refuse me"}},
        clear_faults_after=False,
    ),
    Row("malformed-status", make_plain("status garbled.wav"), "error", archive=True, faults={"malformed_status": 50}),
    Row(
        "zip-bomb",
        make_plain("bomb.wav"),
        "error",
        archive=True,
        faults={"zip_attack": "oversized", "zip_bomb_bytes": 64 << 20},
    ),
    Row(
        "dotdot-stem-names",
        make_plain("hostile stems.wav"),
        "done",
        what_user_sees="delivered under safe names; nothing outside the output folder",
        archive=True,
        versions=("original", "original_stems"),
        faults={"hostile_stem_names": True},
    ),
    Row(
        "redirect-to-file-url",
        make_plain("redirected.wav"),
        "error",
        archive=True,
        # the archive is "queued for e-mail", so each object is fetched by GET /download, which redirects
        faults={"redirect_to": "file:///etc/passwd", "email_queued": 50},
    ),
]


def _wait(ctx: Ctx, condition: Callable[[], Any], timeout: float, what: str) -> None:
    """wait_for, with the end of the daemon's log in the failure message."""
    try:
        wait_for(condition, timeout=timeout, what=what)
    except AssertionError as exc:
        tail = "\n".join(repr(e) for e in ctx.logs[-25:])
        raise AssertionError(f"{exc}\nthe daemon's last log events:\n{tail}") from None


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` outside the configured folders, with its size and mode."""
    seen = {}
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(current, d) not in skip]
        for name in dirs + files:
            p = os.path.join(current, name)
            st = os.lstat(p)
            seen[os.path.relpath(p, root)] = (st.st_size if not stat.S_ISDIR(st.st_mode) else 0, st.st_mode)
    return seen


def status_json(state: Path) -> dict[str, Any]:
    """`watcher status --json`, run as the user would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env["WATCHER_STATE_DIR"] = str(state)
    proc = subprocess.run(
        [sys.executable, "-m", "watcher", "status", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def _set_faults(faults: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        if not hasattr(faults, name):
            pytest.skip(f"the emulator has no `{name}` fault yet (helper E's hostile faults are not merged)")
        setattr(faults, name, value)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(analysis_key=API_KEY, processing_key=PKEY, use_local=False) as e:
        e.processing.faults.polls_needed = 1
        yield e


def _done(tmp: Path, path: str, archive: bool) -> bool:
    """The file's analysis (and archive) jobs are done and its sidecar is beside it."""
    if not os.path.exists(path + ".analysis.json"):
        return False
    kinds = ("analyze", "archive") if archive else ("analyze",)
    for kind in kinds:
        row = query(
            tmp,
            "SELECT j.state FROM jobs j JOIN files f ON f.id = j.file_id WHERE f.path = ? AND j.pipeline = ? "
            "ORDER BY j.id DESC",
            to_db(path),
            kind,
        )
        if not row or row[0] != "done":
            return False
    return True


@pytest.mark.parametrize(
    "row",
    [pytest.param(r, marks=pytest.mark.xfail(strict=True, reason=r.core_gap)) if r.core_gap else r for r in ROWS],
    ids=[r.id for r in ROWS],
)
def test_bad_input(row: Row, tmp_path: Path, emu: Emulator, run_daemon: Callable[..., Any]) -> None:
    if row.root and os.geteuid() != 0:
        pytest.skip("needs root (mknod or mount)")
    inbox, spare, out, state = tmp_path / "inbox", tmp_path / "spare", tmp_path / "out", tmp_path / "state"
    for d in (inbox, spare, out, tmp_path / "staging"):  # staging: where the test writes before moving in
        d.mkdir()
    write_tone(tmp_path / "elsewhere" / "private.wav", 0.2, freq=999)
    ctx = Ctx(tmp_path, inbox, spare, out, emu, [])
    mounts: list[Path] = []
    try:
        if row.id == "share-vanishes-mid-scan":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "share", str(inbox)], check=True)
            mounts.append(inbox)
        if row.id == "output-disk-full":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "output", str(out)], check=True)
            mounts.append(out)
        _run_row(row, ctx, state, run_daemon)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
        for fn in ctx.cleanup:
            fn()


def _run_row(row: Row, ctx: Ctx, state: Path, run_daemon: Callable[..., Any]) -> None:
    tmp, inbox, spare, out = ctx.tmp, ctx.inbox, ctx.spare, ctx.out
    settings = make_settings(tmp, inbox, ctx.emu.url)
    folders = (
        FolderConfig(path=inbox, settle_seconds=0.3, rescan_interval=2),
        FolderConfig(path=spare, settle_seconds=0.3, rescan_interval=2),
    )
    update: dict[str, Any] = {"folders": folders}
    if row.archive:
        update["archive"] = ArchiveConfig(
            enabled=True,
            base_url=ctx.emu.url,
            api_key=PKEY,
            output_dir=out,
            poll_initial=0.05,
            poll_max=0.2,
            versions=row.versions,
            max_archive_bytes=16 << 20,
        )
    update["retry"] = settings.retry.model_copy(update={"max_attempts": 2, "backoff_initial": 0.2})
    settings = settings.model_copy(update=update)
    before = snapshot(tmp, {inbox, spare, out, state})
    good_folder = spare if row.good_in_spare else inbox
    with structlog.testing.capture_logs() as logs:
        ctx.logs = logs
        d = run_daemon(settings)
        first = str(write_tone(good_folder / "good before.wav", 0.3, freq=440))
        _wait(ctx, lambda: _done(tmp, first, row.archive), 30, "the first good file")
        _set_faults(ctx.emu.processing.faults, row.faults)
        row.make(ctx)
        _wait_bad_outcome(row, ctx)
        if row.clear_faults_after:
            for name in row.faults:
                setattr(ctx.emu.processing.faults, name, type(getattr(ctx.emu.processing.faults, name))())
        second = str(write_tone(good_folder / "good after.wav", 0.3, freq=880))
        _wait(ctx, lambda: _done(tmp, second, row.archive), 45, "the good file dropped after the bad one")
        d.stop()
    _check_bad(row, ctx)
    leftovers = [p for p in out.rglob(".watcher-tmp*")] if out.is_dir() else []
    assert not leftovers, f"half-written output left behind: {leftovers}"
    after = snapshot(tmp, {inbox, spare, out, state})
    assert after == before, f"written outside the configured folders: {sorted(set(after) ^ set(before))}"
    assert not (Path("/srv/absolute.wav").exists() or (tmp.parent / "escape").exists())


def _wait_bad_outcome(row: Row, ctx: Ctx) -> None:
    def reached() -> bool:
        if row.expect == "done":
            for p in ctx.bad:
                failed = query(
                    ctx.tmp,
                    "SELECT j.pipeline, j.last_error FROM jobs j JOIN files f ON f.id = j.file_id "
                    "WHERE f.path = ? AND j.state = 'failed'",
                    to_db(p),
                )
                if failed:
                    raise AssertionError(f"{display(p)} failed in {failed[0]}: {failed[1]}")
            return all(_done(ctx.tmp, p, row.archive) for p in ctx.bad)
        return all(ctx.mentions(p) or _failed_or_retrying(ctx.tmp, p) for p in ctx.bad)

    _wait(ctx, reached, 60, f"the bad input's outcome ({row.expect})")
    ctx.status = status_json(ctx.tmp / "state")  # what the user sees while the bad input is there


def _failed_or_retrying(tmp: Path, path: str) -> bool:
    row = query(
        tmp,
        "SELECT j.state, j.last_error FROM jobs j JOIN files f ON f.id = j.file_id WHERE f.path = ? "
        "AND (j.state IN ('failed', 'gone', 'superseded') OR (j.state != 'done' AND j.last_error IS NOT NULL))",
        to_db(path),
    )
    return row is not None


def _check_bad(row: Row, ctx: Ctx) -> None:
    for path in ctx.bad:
        if row.expect == "done":
            assert _done(ctx.tmp, path, row.archive), display(path)
            continue
        problems = ctx.problem(path)
        said = ctx.mentions(path)
        assert problems or said, f"nothing names {display(path)} in status --json problems or the log"
        for p in problems:
            assert p.get("error"), p
        if row.expect == "skipped":
            assert query(ctx.tmp, "SELECT id FROM files WHERE path = ?", to_db(path)) is None, "it became work"
        print(
            f"{row.id}: {display(os.path.basename(path))} -> "
            + "; ".join(
                [f"status: {p.get('pipeline')} {p.get('state')}: {p['error']}" for p in problems]
                + [f"log: {e.get('event')}: {e.get('error') or e.get('reason') or ''}" for e in said[:2]]
            )
        )


@contextlib.contextmanager
def _world_readable_tmp() -> Iterator[Path]:
    """A temp folder any user can enter (pytest's own is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="watcher-matrix-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.bill_exempt("the daemon runs as `nobody` with its store in a world-readable folder that is gone by then")
def test_unreadable_file_as_an_unprivileged_daemon(emu: Emulator) -> None:
    """chmod 000 file, the daemon run as `nobody`: the file fails with a clear reason, the next one is analysed."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run the daemon as another user")
    with _world_readable_tmp() as base:
        inbox, state = base / "inbox", base / "state"
        inbox.mkdir(mode=0o777)
        inbox.chmod(0o777)
        state.mkdir()
        shutil.chown(state, "nobody")
        locked = write_tone(inbox / "locked.wav", 0.3, freq=300)
        locked.chmod(0)
        cfg = base / "w.toml"
        cfg.write_text(f'[[folders]]\npath = "{inbox}"\nsettle_seconds = 0.3\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
        env.update(
            WATCHER_STATE_DIR=str(state),
            WATCHER_ANALYSIS__BASE_URL=emu.url,
            WATCHER_RETRY__MAX_ATTEMPTS="2",
            WATCHER_RETRY__BACKOFF_INITIAL="0.2",
            ESSENTIA_API_KEY=API_KEY,
            HOME=str(base),
            XDG_CONFIG_HOME=str(base / "xdg"),
            XDG_STATE_HOME=str(base / "xdg-state"),
            PYTHONDONTWRITEBYTECODE="1",
        )
        probe = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", "import watcher"],
            env=env,
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            pytest.skip(f"`nobody` cannot run this checkout's Python: {probe.stderr.strip()[-200:]}")
        log_path = base / "watcher.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [
                    "setpriv",
                    "--reuid=nobody",
                    "--regid=nogroup",
                    "--clear-groups",
                    sys.executable,
                    "-m",
                    "watcher",
                    "--config",
                    str(cfg),
                    "--log-format",
                    "json",
                    "run",
                ],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: "locked.wav" in log_path.read_text() and "job." in log_path.read_text(), timeout=30)
            good = write_tone(inbox / "open.wav", 0.3, freq=620)
            wait_for(lambda: Path(str(good) + ".analysis.json").exists(), timeout=30, what="the next file analysed")
        finally:
            proc.terminate()
            proc.wait(15)
        report = status_json(state)
        problems = [p for p in report["problems"] if p["path"] == str(locked)]
        assert problems and "ermission denied" in (problems[0]["error"] or ""), (problems, log_path.read_text())
        print(f"unreadable: locked.wav -> status: {problems[0].get('state')}: {problems[0]['error']}")
