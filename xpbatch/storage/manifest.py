"""The run manifest: the one way every stage claims its output, fingerprints its run, lists what
is left, records what is done and marks the whole complete (hats-import's ``ResumePlan``).

One rule for every command that writes (:meth:`RunManifest.claim`):

- nothing at the output: a new run (also with ``resume``: a restarted job script may always pass
  ``--resume``);
- something xpbatch did not write (no record of a run, or a record that is not xpbatch's):
  refused whatever the flags say, so ``--overwrite`` never removes a user's file;
- another command's output (a record of another kind, e.g. a catalogue where a store is asked
  for): refused too; one command never replaces another's output;
- ``overwrite``: the earlier output of the same kind is replaced and the run starts again;
- ``resume``: the earlier run is continued when its fingerprint (inputs and the options that
  change the result) equals this run's (:meth:`RunManifest.check`), else refused;
- neither: refused with :class:`~xpbatch.errors.OutputExistsError`.

A manifest is kept in a :class:`RunRecord`: a JSON file (:class:`JsonRecord`; inside a directory
output, ``_xpbatch_run.json``; beside a single-file output, ``OUTPUT.xpbatch.json``) in one
format (``kind``, ``fingerprint``, ``done``, ``complete``), or, where the output describes
itself (a Zarr store's or catalogue's attributes, a model file's header), a record that reads
the same fields from there. Hold :func:`xpbatch.storage.outputs.output_lock` on the output
while claiming and writing (every stage function does).
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from xpbatch import __version__, schema
from xpbatch.errors import OutputExistsError, ResumeRefusedError
from xpbatch.storage.location import Location, as_location, is_url
from xpbatch.storage.outputs import remove_path
from xpbatch.storage.paths import PathLike, atomic_path

logger = logging.getLogger(__name__)

T = TypeVar("T")

RECORD_FORMAT = "xpbatch-run"
"""The ``format`` of every JSON run record."""
RECORD_VERSION = 1
RECORD_NAME = "_xpbatch_run.json"
"""The run record inside a directory output."""
SIDECAR_SUFFIX = ".xpbatch.json"
"""Appended to a single-file output's name to name its run record beside it."""

STORE_KIND = "XP store"
"""What ``ingest`` and ``mock`` write."""
CATALOG_KIND = "catalogue"
"""What ``encode-catalog`` writes."""
KIND, FINGERPRINT, DONE, COMPLETE = "kind", "fingerprint", "done", "complete"
"""The fields of a run record (what :meth:`RunRecord.read` returns)."""


def utc_now() -> str:
    """The time now, as records write it."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def real_output(output: PathLike) -> Path:
    """``output`` with a symlink at its place resolved: a run writes (and ``--overwrite``
    replaces) the target, never the link, and its lock is the target's."""
    output = Path(output)
    return Path(os.path.realpath(output)) if output.is_symlink() else output


def real_place(output: PathLike | Location) -> Path | Location:
    """:func:`real_output` of a local path; an object-storage URL (no links there) as its
    :class:`Location`."""
    place = _place(output)
    return place if isinstance(place, Location) else real_output(place)


class RunRecord(abc.ABC):
    """Where a stage's run manifest lives on disk."""

    where: Path | Location
    """The file (or object) that holds it (for messages)."""

    @abc.abstractmethod
    def read(self) -> dict[str, Any] | None:
        """The recorded fields (:data:`KIND`, :data:`FINGERPRINT`, :data:`DONE`,
        :data:`COMPLETE`); None when nothing is recorded; ``{KIND: None}`` when what is there is
        not an xpbatch record."""

    @abc.abstractmethod
    def write(self, fields: Mapping[str, Any]) -> None:
        """Record ``fields`` (replacing the earlier record); a record of an output that
        describes itself may record nothing (its stage writes those attributes)."""


class JsonRecord(RunRecord):
    """A run record in one JSON file, written atomically."""

    where: Path

    def __init__(self, where: PathLike) -> None:
        self.where = Path(where)

    @classmethod
    def inside(cls, directory: PathLike) -> JsonRecord:
        """The record of a directory output: ``DIR/_xpbatch_run.json``."""
        return cls(Path(directory) / RECORD_NAME)

    @classmethod
    def beside(cls, file: PathLike) -> JsonRecord:
        """The record of a single-file output: ``FILE.xpbatch.json``."""
        file = Path(file)
        return cls(file.with_name(file.name + SIDECAR_SUFFIX))

    def read(self) -> dict[str, Any] | None:
        try:
            text = self.where.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {KIND: None}
        return _record_of(text)

    def write(self, fields: Mapping[str, Any]) -> None:
        self.where.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.where) as tmp:
            tmp.write_text(_record_text(fields))


class JsonObjectRecord(RunRecord):
    """A run record in one JSON object on object storage (one PUT: atomic)."""

    where: Location

    def __init__(self, where: Location) -> None:
        self.where = where

    def read(self) -> dict[str, Any] | None:
        try:
            data = self.where.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _record_of(data.decode())
        except UnicodeDecodeError:
            return {KIND: None}

    def write(self, fields: Mapping[str, Any]) -> None:
        self.where.write_bytes(_record_text(fields).encode())


def record_inside(directory: PathLike | Location) -> JsonRecord | JsonObjectRecord:
    """The JSON run record of a directory output or an object-storage prefix."""
    place = _place(directory)
    if isinstance(place, Location):
        return JsonObjectRecord(place / RECORD_NAME)
    return JsonRecord.inside(place)


def _record_of(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text)
    except ValueError:
        return {KIND: None}
    if not isinstance(found, dict) or found.get("format") != RECORD_FORMAT:
        return {KIND: None}
    return found


def _record_text(fields: Mapping[str, Any]) -> str:
    record = {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, **fields}
    return json.dumps(record, indent=1, sort_keys=True, default=str)


def _place(target: PathLike | Location) -> Path | Location:
    """A local path as a ``Path``, an object-storage URL as a :class:`Location`."""
    if isinstance(target, Location):
        return target.path if target.is_local else target
    return as_location(target) if is_url(target) else Path(target)


class ZarrRecord(RunRecord):
    """The record of a Zarr group that describes itself (an XP store, a catalogue): its kind
    from the schema-version attribute xpbatch writes, ``complete`` from its attributes. Its
    stage writes those attributes, so :meth:`write` records nothing."""

    KINDS: ClassVar[dict[str, str]] = {
        schema.STORE_ATTR_SCHEMA_VERSION: STORE_KIND,
        schema.CATALOG_ATTR_SCHEMA_VERSION: CATALOG_KIND,
    }
    """Attribute xpbatch writes into a group -> the kind of that group."""

    def __init__(self, path: PathLike | Location, *, fingerprint: str | None = None) -> None:
        self.path = _place(path)
        self.where = self.path / "zarr.json"
        self.fingerprint = fingerprint
        """The attribute that holds the run's fingerprint, if one does."""

    def attrs(self) -> dict[str, Any] | None:
        """The group's attributes; None when there is no group; {} when unreadable."""
        import zarr

        if not self.where.is_file():
            return None
        target = (
            self.path.zarr_store(read_only=True) if isinstance(self.path, Location) else self.path
        )
        try:
            return dict(zarr.open_group(target, mode="r").attrs.asdict())
        except (OSError, ValueError, zarr.errors.BaseZarrError):
            return {}

    def read(self) -> dict[str, Any] | None:
        attrs = self.attrs()
        if attrs is None:
            return None
        kind = next((kind for marker, kind in self.KINDS.items() if marker in attrs), None)
        found = attrs.get(self.fingerprint) if self.fingerprint else None
        return {KIND: kind, FINGERPRINT: found, COMPLETE: attrs.get(COMPLETE)}

    def write(self, fields: Mapping[str, Any]) -> None:
        """Nothing: the stage writes the group's attributes."""


@dataclasses.dataclass(frozen=True)
class ResumePlan(Generic[T]):
    """The work items an earlier run finished and those left. Every stage's summary counts
    ``done`` as reused."""

    resumed: bool
    """Whether an earlier run is continued."""
    done: tuple[T, ...]
    """Items an earlier run finished (kept, not redone)."""
    todo: tuple[T, ...]
    """Items this run does."""


Out = TypeVar("Out", bound=Path | Location)


@dataclasses.dataclass
class RunManifest(Generic[Out]):
    """A stage's run at its output: claim it, check the fingerprint, plan, record, complete.

    Examples
    --------
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "export"
    >>> run = RunManifest(out, kind="example", record=JsonRecord.inside(out),
    ...                   fingerprint={"input": "a"})
    >>> run.claim(resume=True, overwrite=False)  # nothing there: a new run
    False
    >>> run.begin(); run.record_done("part-1", 10); run.mark_complete()
    >>> again = RunManifest(out, kind="example", record=JsonRecord.inside(out),
    ...                     fingerprint={"input": "a"})
    >>> again.claim(resume=True, overwrite=False), again.recorded_done()
    (True, {'part-1': 10})
    """

    output: Out
    """The output as the user named it (for messages): a path, or a URL's location."""
    kind: str
    """What the stage writes, e.g. ``"catalogue"``, ``"XP store"``, ``"Parquet export"``."""
    record: RunRecord
    """Where the manifest is kept."""
    fingerprint: Mapping[str, Any] | None = None
    """What a run must match to be resumed (plain JSON values: inputs, result options); None
    when the stage checks it later (:meth:`check`)."""
    previous: dict[str, Any] | None = None
    """What the earlier run recorded (set by :meth:`claim`)."""
    resumed: bool = False
    """Whether :meth:`claim` continues an earlier run."""
    _done: dict[str, Any] = dataclasses.field(default_factory=dict)
    _fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    def claim(
        self,
        *,
        resume: bool,
        overwrite: bool,
        exists: bool | None = None,
        found: str = "",
        foreign: bool = False,
        remove: Callable[[], None] | None = None,
    ) -> bool:
        """Apply the one output rule (module docstring); return whether an earlier run continues.

        ``exists`` says whether an earlier run left anything (default: the output exists);
        ``found`` describes it for the messages; ``foreign`` says that files xpbatch did not
        write are there, whatever the record says; ``remove`` is what ``overwrite`` removes
        (default: the output and its record; a function that does nothing leaves them for the
        run to replace).
        """
        output = self.output
        if exists is None:
            exists = output.exists() or (isinstance(output, Path) and output.is_symlink())
        if not exists:
            if resume:
                logger.info("%s: nothing to resume, starting a new %s", output, self.kind)
            return False
        recorded = self.record.read()
        # Object storage has no empty directories: an empty prefix does not exist.
        empty = isinstance(output, Path) and output.is_dir() and not any(output.iterdir())
        kind = None if foreign else (recorded or {}).get(KIND)
        if foreign or (kind != self.kind and not (empty and recorded is None)):
            refused = ResumeRefusedError if resume else OutputExistsError
            what = (
                f"an xpbatch {kind}, not the {self.kind} this command writes: one command never "
                "replaces or resumes another's output"
                if kind
                else f"not an xpbatch {self.kind} ({found or 'no record of an xpbatch run'}); "
                "it is never overwritten or resumed"
            )
            raise refused(
                f"{output} exists and is {what}; choose another output path. Nothing was changed."
            )
        if overwrite:
            logger.info("overwriting %s", output)
            (remove or (lambda: self.remove(output)))()
            return False
        if not resume:
            raise OutputExistsError(
                f"{output} already exists ({found or f'an xpbatch {self.kind}'}); pass --resume "
                "to continue it, --overwrite to replace it, or choose another output path. "
                "Nothing was changed."
            )
        self.previous = recorded or {}
        self._done = dict(self.previous.get(DONE) or {})
        if self.fingerprint is not None:
            self.check(self.previous.get(FINGERPRINT) or {})
        self.resumed = True
        return True

    def remove(self, output: Path | Location) -> None:
        """What ``--overwrite`` removes by default: the output and its record."""
        if isinstance(output, Location):
            output.remove_tree()
            if isinstance(self.record.where, Location):
                self.record.where.remove_tree()
            return
        remove_path(output)
        if isinstance(self.record.where, Path):
            self.record.where.unlink(missing_ok=True)

    def check(self, found: Mapping[str, Any], *, what: str = "") -> None:
        """Refuse ``--resume`` of a run recorded with another fingerprint than this run's.

        Raises
        ------
        ResumeRefusedError
            Naming every key that differs, with both values.
        """
        expected = self.fingerprint or {}
        differences = [
            f"{key}: {found.get(key)!r} there, {expected.get(key)!r} now"
            for key in sorted(set(found) | set(expected))
            if _plain(found.get(key)) != _plain(expected.get(key))
        ]
        if differences:
            raise ResumeRefusedError(
                f"cannot --resume {self.output}: that {what or self.kind} was written from other "
                "inputs or options (" + "; ".join(differences) + "). Rerun with the same ones, or "
                "with --overwrite to start again. Nothing was changed."
            )

    @property
    def complete(self) -> bool:
        """Whether the earlier run (continued by this one) was marked complete."""
        return bool(self.resumed and (self.previous or {}).get(COMPLETE) is True)

    def plan(self, items: Iterable[T], is_done: Callable[[T], bool]) -> ResumePlan[T]:
        """Split ``items`` by ``is_done`` (asked only when resuming: a new run does them all)."""
        items = tuple(items)
        if not self.resumed:
            return ResumePlan(False, (), items)
        finished = [is_done(item) for item in items]
        done = tuple(item for item, f in zip(items, finished, strict=True) if f)
        todo = tuple(item for item, f in zip(items, finished, strict=True) if not f)
        return ResumePlan(True, done, todo)

    def recorded_done(self) -> dict[str, Any]:
        """The items recorded done so far (by an earlier run and this one), with their records."""
        return dict(self._done)

    def begin(self, **extra: Any) -> None:
        """Record this run as started (not complete); ``extra`` fields describe it."""
        times = [*(self.previous or {}).get("resumed", []), utc_now()] if self.resumed else []
        started = (self.previous or {}).get("started") if self.resumed else None
        self._fields = {
            KIND: self.kind,
            FINGERPRINT: dict(self.fingerprint or {}),
            "xpbatch_version": __version__,
            "started": started or utc_now(),
            "resumed": times,
            **extra,
        }
        self._write(complete=False)

    def record_done(self, item: str, value: Any = True) -> None:
        """Record ``item`` done (its record ``value``)."""
        self._done[item] = value
        self._write(complete=False)

    def mark_complete(self, **extra: Any) -> None:
        """Record the whole output complete (with ``extra`` fields, e.g. what it holds)."""
        self._fields = {**(self._fields or {KIND: self.kind}), "finished": utc_now(), **extra}
        self._write(complete=True)

    def _write(self, *, complete: bool) -> None:
        fields = self._fields or {KIND: self.kind}
        self.record.write({**fields, DONE: self._done, COMPLETE: complete})


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists), so recorded and new compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def file_manifest(output: PathLike | Location, *, kind: str) -> RunManifest[Path | Location]:
    """The manifest of a single-file output (a table, a picture): its record beside it, its
    path with a symlink resolved; on object storage the object ``OUTPUT.xpbatch.json``."""
    place = real_place(output)
    if isinstance(place, Location):
        record: RunRecord = JsonObjectRecord(place.sibling(place.name + SIDECAR_SUFFIX))
        return RunManifest(place, kind=kind, record=record)
    return RunManifest(place, kind=kind, record=JsonRecord.beside(place))
