"""`watcher scan --dry-run`: what a scan would ask of the paid services, without asking or writing anything.

Per file: the analysis models still missing for its content and how the service would get the audio (its
bytes, or the URL of the folder's ``audio_url_template``), the versions the archive would deliver and
the paid processing calls they imply (minus those already answered), and its length from the headers.
Totals per service: paid calls and minutes of audio. Files are only read (to hash them); nothing is sent,
nothing is written, and the store is consulted only through the two callables the caller passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from watcher.audiofile import check_audio, sha256_of
from watcher.config import FolderConfig, Settings
from watcher.config.audio_url import without_query
from watcher.detect.filters import PathFilter
from watcher.detect.scan import walk
from watcher.errors import BadInput
from watcher.media import audio_info, charged_seconds
from watcher.names import display
from watcher.versions import OPERATION_ORDER, operations_for

ANALYSIS = "analysis (Essentia API)"
PROCESSING = "processing (Neural Analog)"


@dataclass(frozen=True)
class FileEstimate:
    """What a scan would do for one file."""

    path: str
    size: int
    sha256: str
    seconds: float | None  # what a paid request is charged: the duration, or an upper bound when it is unknown
    duration_note: str | None  # "estimated: ..." when ``seconds`` is an upper bound (the headers give no duration)
    models: tuple[str, ...]  # analysis models it would ask for
    cached_models: tuple[str, ...]  # configured models already stored for this content
    versions: tuple[str, ...]  # archive versions it would deliver
    calls: tuple[str, ...]  # paid processing calls it would make (upload, restore, master, stems:<source>)
    same_as: str | None = None  # an earlier file of this run with the same content: the gate pays for it once
    analysis_input: str = "body"  # "body", "local" (read here), or "audio-url <URL without its query>"


@dataclass
class ServiceTotal:
    """Paid calls to one service and the audio they carry."""

    calls: int = 0
    seconds: float = 0.0
    unknown_duration: int = 0  # calls whose audio length is unknown (in ``seconds`` at an upper bound)
    by_call: dict[str, int] = field(default_factory=dict)


@dataclass
class DryRunReport:
    """The result of :func:`dry_run`; :meth:`render` gives the text a terminal prints."""

    files: list[FileEstimate] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    totals: dict[str, ServiceTotal] = field(
        default_factory=lambda: {ANALYSIS: ServiceTotal(), PROCESSING: ServiceTotal()}
    )

    def render(self) -> str:
        """Human-readable text: one block per file, then the skipped files, then the totals per service."""
        lines = [f"Dry run: {_count(len(self.files), 'file')}; nothing was sent and nothing was written.", ""]
        for f in self.files:
            length = _seconds(f.seconds or 0.0) + (f", {f.duration_note}" if f.duration_note else "")
            lines.append(f"{display(f.path)}  ({length})")
            if f.same_as is not None:
                lines.append(f"  same content as {display(f.same_as)}: paid once, for both")
            elif f.models:
                cached = f"; already stored: {', '.join(f.cached_models)}" if f.cached_models else ""
                lines.append(f"  analysis: would ask {', '.join(f.models)}{cached}; input: {_input_text(f)}")
            else:
                lines.append("  analysis: nothing to ask (every model is stored, or analysis is off)")
            if f.versions and f.same_as is None:
                calls = ", ".join(f.calls) if f.calls else "none (all answered before)"
                lines.append(f"  archive: versions {', '.join(f.versions)}; paid calls: {calls}")
        if self.skipped:
            lines += ["", "Skipped:"]
            lines += [f"  {display(path)}: {why}" for path, why in self.skipped]
        lines += ["", "Totals:"]
        for service, total in self.totals.items():
            kinds = ", ".join(f"{name} {n}" for name, n in _ordered(total.by_call))
            line = f"  {service}: {_count(total.calls, 'paid call')}, {total.seconds / 60:.1f} min of audio"
            if kinds:
                line += f" ({kinds})"
            if total.unknown_duration:
                line += (
                    f"; {_count(total.unknown_duration, 'call')} on audio of unknown duration, counted at an upper "
                    "bound (estimated) and settled to the real length in the ledger"
                )
            lines.append(line)
        return "\n".join(lines) + "\n"


def dry_run(
    settings: Settings,
    paths: Sequence[Path],
    *,
    cached_models: Callable[[str], set[str]],
    answered_operations: Callable[[str], set[str]],
    remote: bool = True,
) -> DryRunReport:
    """What ``watcher scan PATHS`` would ask of the services, from the files, the config and the store's answers.

    ``cached_models(sha256)``: the model specs already stored for that content; ``answered_operations(sha256)``:
    the processing operations already answered (``upload``, ``restore``, ``master``, ``stems:<source>``).
    ``remote``: analysis goes to the service (URL templates apply), else it runs locally.
    """
    report = DryRunReport()
    models = settings.analysis.models if settings.analysis.enabled else ()
    versions = settings.archive.wanted() if settings.archive.enabled else ()
    needed_calls = operations_for(versions)
    seen: set[str] = set()
    first_with: dict[str, str] = {}  # content -> the first file of this run that has it
    for path, why, folder in _files(settings, paths):
        if path in seen:
            continue
        seen.add(path)
        if why is not None:
            report.skipped.append((path, why))
            continue
        looked = _look(path)
        if isinstance(looked, str):
            report.skipped.append((path, looked))
            continue
        size, sha256, container = looked
        info = audio_info(path, container=container)
        charged, estimated = charged_seconds(info, size, container)
        same_as = first_with.setdefault(sha256, path)
        copy = same_as != path
        cached = set(models) if copy else set(cached_models(sha256))
        answered = set(needed_calls) if copy else set(answered_operations(sha256))
        estimate = FileEstimate(
            path=path,
            size=size,
            sha256=sha256,
            seconds=charged,
            duration_note=f"estimated: at most that ({info.reason})" if estimated else None,
            models=tuple(m for m in models if m not in cached),
            cached_models=() if copy else tuple(m for m in models if m in cached),
            versions=versions,
            calls=tuple(c for c in needed_calls if c not in answered),
            same_as=same_as if copy else None,
            analysis_input=_input_of(settings, folder, path) if remote else "local",
        )
        report.files.append(estimate)
        _add(report.totals[ANALYSIS], ["stream"] if estimate.models else [], charged, estimated=estimated)
        _add(report.totals[PROCESSING], estimate.calls, charged, estimated=estimated)
    return report


def _look(path: str) -> tuple[int, str, str] | str:
    """(size, sha256, format) of a file a scan would send, or why a scan would not (read only)."""
    try:
        size, sha256 = sha256_of(path)
        if size == 0:
            return "empty; a scan skips it"
        container = check_audio(path)
    except BadInput as exc:
        return f"a scan would refuse it, sending nothing: {exc}"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}); a scan would retry it"
    return size, sha256, container


def _add(total: ServiceTotal, calls: Sequence[str], seconds: float, *, estimated: bool = False) -> None:
    """Count ``calls`` (each carrying the file's audio once) into ``total``."""
    for call in calls:
        total.calls += 1
        total.by_call[call] = total.by_call.get(call, 0) + 1
        total.seconds += seconds
        if estimated:
            total.unknown_duration += 1


def _input_of(settings: Settings, folder: FolderConfig, path: str) -> str:
    """How the analysis service would get ``path``: ``body``, or ``audio-url <URL without its query>``."""
    url = settings.audio_url_for(str(folder.path), os.path.relpath(path, folder.path))
    return "body" if url is None else f"audio-url {without_query(url)}"


def _input_text(f: FileEstimate) -> str:
    if f.analysis_input == "body":
        return "the file's bytes in the request"
    if f.analysis_input == "local":
        return "read here (local backend)"
    return f"the service fetches {f.analysis_input.removeprefix('audio-url ')}"


def _files(settings: Settings, paths: Sequence[Path]) -> Iterator[tuple[str, str | None, FolderConfig]]:
    """Each candidate file with None, or with why it is not work, and its folder; folders walked with the
    filters of the configured folder they lie in."""
    for raw in paths:
        path = Path(os.path.abspath(raw))
        folder = _folder_of(settings, path)
        path_filter = PathFilter(folder.include, folder.exclude, settings.own_dirs(folder))
        if path.is_dir():
            start = str(path) if path != folder.path else None
            for found in walk(str(folder.path), path_filter, recursive=folder.recursive, start=start):
                yield found, None, folder
        elif path.is_file():
            rel = os.path.relpath(path, folder.path)
            wanted = path_filter.wants_file(rel)
            yield str(path), None if wanted else "not work for its folder (include/exclude)", folder
        else:
            yield str(path), "does not exist", folder


def _folder_of(settings: Settings, path: Path) -> FolderConfig:
    """The configured folder ``path`` is in (the deepest), else default options rooted at it (or its parent)."""
    configured = settings.folder_for(path)
    if configured is not None:
        return configured
    return FolderConfig(path=path) if path.is_dir() else FolderConfig(path=path.parent, recursive=False)


def _ordered(by_call: dict[str, int]) -> list[tuple[str, int]]:
    rank = {op: n for n, op in enumerate(OPERATION_ORDER)}
    return sorted(by_call.items(), key=lambda kv: (rank.get(kv[0], -1), kv[0]))


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
