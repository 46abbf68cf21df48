"""DICOM SEG masks of DICOM image volumes: the ``volumes`` source with ``format: dicom`` and
``masks_format: seg``. highdicom reads the SEG files; pydicom reads the image headers.

Matching (at index time, no pixel read)
---------------------------------------
Every file under the masks folder (sub-folders included; hidden files and ``DICOMDIR``
aside) whose SOP Class UID is Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4) is a
SEG, whatever its name; files that are not DICOM, or DICOM of another class, are
ignored. A SEG is matched to the image volume (series folder, or multi-frame file) that
holds the SOP instances it references: in its Referenced Series Sequence (and the other
reference sequences highdicom reads) and in each frame's Derivation Image Sequence. The
record takes the image's name (series folder name or file stem), never the SEG's.
Errors, each naming the site and the files: a SEG referencing no image present, or
images of several series; a SEG referencing instances its series does not hold; two
SEGs of one series; a series without a SEG; a SEG whose frames do not record their
source image, or record that spatial locations were not preserved (``NO``,
``REORIENTED_ONLY``); a segment the job's ``segments`` names that the SEG lacks.

Reading
-------
The label volume is built in the image volume's own slice order (the order
:func:`~medfed.data.readers.volumes.load_dicom_series` sorts the slices in, or the frame
order of a multi-frame file), one segment at a time, by source instance (or source
frame). Frames of a FRACTIONAL SEG are in the segment where their value is at least 0.5
(after scaling by MaximumFractionalValue); BINARY frames where they are 1. Slices the
SEG leaves out are background. Segment k is class k unless the job's ``segments`` maps
classes to segments (by SegmentLabel, matched exactly, or segment number); segments it
does not name are background. Where segments overlap, the higher class wins (so a
lesion class above its organ's class keeps the lesion inside the organ). The SEG's
frames must have the images' rows and columns.

Errors: a SEG that cannot be read or decoded is an ``UnreadableFile`` (``on_bad_file:
skip`` leaves its series out); mismatches between files are ``DataError``. Under
``skip``, a header that cannot be read at index time (an image file or a SEG) leaves
its series out too, listed in ``skipped`` when the site is read. No error text holds a
header value: UIDs and every text value of the header are blanked out of library
messages.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.core.errors import DataError
from medfed.data.readers.dicom_common import scrub
from medfed.data.readers.folder import UnreadableFile, is_hidden

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_UID = re.compile(r"\d+(?:\.\d+){2,}")


def _reason(e: Exception, ds=None) -> str:
    """What a library error may say: header text values and UIDs blanked out; only the
    error's type when no header is at hand to blank (pydicom's "not DICOM" aside)."""
    import pydicom

    text = f"{type(e).__name__}: {e}"
    if ds is not None:
        text = scrub(text, ds)
    elif not isinstance(e, pydicom.errors.InvalidDicomError):
        text = type(e).__name__
    return _UID.sub("<uid>", text)


@contextmanager
def _quiet():
    """pydicom's and highdicom's warnings silenced: they may quote header values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class SegMatch:
    """A SEG matched to its image volume: ``classes`` pairs (segment number, class)."""

    name: str
    seg: Path
    classes: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class RefusedEntry:
    """An index row for a series or a SEG left out while indexing (``on_bad_file:
    skip``): a header that could not be read, or a series no readable SEG matches.
    Reading it raises that refusal, so that the site lists it in ``skipped`` (see
    :class:`~medfed.data.base.Entry`)."""

    name: str
    split: str | None
    site: str
    path: str
    reason: str
    target: None = None

    def read(self):
        raise UnreadableFile(self.site, self.path, self.reason)

    def files(self) -> tuple[str, ...]:
        return (self.path,) if os.path.exists(self.path) else ()


# --------------------------------------------------------------------------- headers


def _header(path: Path, site: str, what: str, tags: list[str] | None = None):
    """The header of ``path`` (no pixel data). Raises UnreadableFile."""
    import pydicom

    try:
        with _quiet():
            return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    except Exception as e:  # pydicom raises many types for damaged files
        raise UnreadableFile(site, path, f"not a readable DICOM {what} ({_reason(e)})") from None


@dataclass
class _Images:
    """The SOP instances of a site's image volumes, by volume name."""

    owner: dict  # SOP Instance UID -> (volume name, file)
    uids: dict  # volume name -> set of its SOP Instance UIDs
    frames: dict  # volume name -> NumberOfFrames of a multi-frame file
    broken: dict  # volume name -> (file, reason): a header that cannot be read


def _image_instances(images: dict[str, Path], site: str, skip: bool) -> _Images:
    out = _Images({}, {}, {}, {})
    for name, path in images.items():
        files = sorted(p for p in path.iterdir() if p.is_file() and not is_hidden(p)) if path.is_dir() else [path]
        out.uids[name] = set()
        for f in files:
            try:
                ds = _header(f, site, "image", ["SOPInstanceUID", "NumberOfFrames"])
                uid = str(ds.get("SOPInstanceUID") or "")
                if not uid:
                    raise UnreadableFile(site, f, "has no SOP Instance UID, which a DICOM SEG references")
                frames = _ints(ds.get("NumberOfFrames")) or [1]
            except (TypeError, ValueError):
                e = UnreadableFile(site, f, "its Number of Frames is not a number")
                if not skip:
                    raise e from None
                out.broken.setdefault(name, (f, e.reason))
                continue
            except UnreadableFile as e:
                if not skip:
                    raise
                out.broken.setdefault(name, (f, e.reason))
                continue
            if uid in out.owner and out.owner[uid][0] != name:
                raise DataError(f"site '{site}': '{f}' and '{out.owner[uid][1]}' are one DICOM instance "
                                "(the same SOP Instance UID) in two image volumes")
            out.owner[uid] = (name, f)
            out.uids[name].add(uid)
            if not path.is_dir() and frames[0] > 1:
                out.frames[name] = frames[0]
    return out


def _seg_files(masks: Path, site: str, skip: bool):
    """(SEG headers as (path, dataset), unreadable as (path, reason), other DICOM count)."""
    import pydicom

    if not masks.is_dir():
        raise DataError(f"site '{site}': mask folder '{masks}' not found")
    segs, bad, other = [], [], 0
    for folder, dirs, names in os.walk(masks):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            path = Path(folder) / n
            if n.startswith(".") or n.upper() == "DICOMDIR":
                continue
            try:
                with _quiet():
                    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue  # not DICOM (no DICM marker): not a mask
            except Exception as e:
                if not skip:
                    raise UnreadableFile(site, path, f"not a readable DICOM file ({_reason(e)})") from None
                bad.append((path, f"not a readable DICOM file ({_reason(e)})"))
                continue
            sop_class = ds.get("SOPClassUID") or ds.get("file_meta", {}).get("MediaStorageSOPClassUID")
            if not sop_class:  # every DICOM object has one: a damaged or truncated header
                if not skip:
                    raise UnreadableFile(site, path, "DICOM file without a SOP Class UID (damaged or truncated header)")
                bad.append((path, "DICOM file without a SOP Class UID (damaged or truncated header)"))
            elif str(sop_class) == SEG_STORAGE:
                segs.append((path, ds))
            else:
                other += 1
    return segs, bad, other


def _seg_header(path: Path, ds, site: str):
    """The highdicom Segmentation of a header read without its pixels."""
    import highdicom as hd

    try:
        with _quiet():
            return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as e:  # highdicom refuses a malformed SEG with many types
        raise UnreadableFile(site, path, f"not a readable DICOM SEG ({_reason(e, ds)})") from None


def _ints(value) -> list[int]:
    """A DICOM IS value of any multiplicity as ints."""
    if value is None or value == "":
        return []
    return [int(value)] if isinstance(value, (int, str)) else [int(v) for v in value]


def _frame_refs(seg, path: Path, site: str) -> list[tuple[str, list[int]]]:
    """(SOP Instance UID, referenced frame numbers) of each frame's source images; every
    frame must name one, with its spatial locations preserved."""
    out, unnamed, moved = [], 0, set()
    for group in seg.get("PerFrameFunctionalGroupsSequence") or []:
        sources = [s for d in group.get("DerivationImageSequence") or [] for s in d.get("SourceImageSequence") or []]
        if not sources:
            unnamed += 1
        for s in sources:
            kept = str(s.get("SpatialLocationsPreserved") or "YES").upper()
            if kept != "YES":
                moved.add(kept)
            try:
                frames = _ints(s.get("ReferencedFrameNumber"))
            except (TypeError, ValueError):
                raise UnreadableFile(site, path, "a frame's Referenced Frame Number is not a number") from None
            out.append((str(s.get("ReferencedSOPInstanceUID") or ""), frames))
    frames_total = int(seg.get("NumberOfFrames") or 0)
    if unnamed or (frames_total and not out):
        raise DataError(f"site '{site}': DICOM SEG '{path}': {unnamed or frames_total} of its {frames_total} frame(s) "
                        "do not record their source image (Derivation Image Sequence), so they cannot be placed")
    if moved:
        raise DataError(f"site '{site}': DICOM SEG '{path}': its frames record that the source images' pixel locations "
                        f"were not preserved (SpatialLocationsPreserved {', '.join(sorted(moved))})")
    return out


def _classes(seg, path: Path, site: str, segments: dict[int, list] | None, num_classes: int) -> tuple[tuple[int, int], ...]:
    """(segment number, class) pairs, by the job's ``segments`` or segment k -> class k."""
    numbers = sorted(int(n) for n in seg.segment_numbers)
    where = f"site '{site}': DICOM SEG '{path}'"
    if segments and max(segments) >= num_classes:
        raise DataError(f"site '{site}': data.segments names class {max(segments)} but the task has {num_classes} "
                        f"classes (0..{num_classes - 1})")
    if segments is None:
        high = [n for n in numbers if n >= num_classes]
        if high:
            raise DataError(f"{where} has segment number(s) {high[:8]} but the task has {num_classes} classes "
                            f"(0..{num_classes - 1}); map its segments to classes with data.segments")
        return tuple((n, n) for n in numbers)
    out: dict[int, int] = {}
    for cls, refs in sorted(segments.items()):
        for ref in refs:
            if isinstance(ref, int):
                if ref not in numbers:
                    raise DataError(f"{where} has no segment number {ref} (data.segments, class {cls}); "
                                    f"its {len(numbers)} segment(s) are numbered {numbers[:8]}")
                found = [ref]
            else:
                found = [int(n) for n in seg.get_segment_numbers(segment_label=ref)]
                if not found:
                    raise DataError(f"{where} has no segment labelled '{ref}' (data.segments, class {cls})")
                if len(found) > 1:
                    raise DataError(f"{where} has {len(found)} segments labelled '{ref}'; "
                                    "name them by segment number in data.segments")
            for n in found:
                if n in out:
                    raise DataError(f"{where}: segment {n} is named twice in data.segments (by label and number)")
                out[n] = cls
    return tuple(sorted(out.items()))


# --------------------------------------------------------------------------- matching


def _match_one(path: Path, seg, imgs: _Images, images: dict[str, Path], image_dir: Path, site: str) -> str:
    """The name of the image volume the SEG references (see the module docstring)."""
    frame_refs = _frame_refs(seg, path, site)
    refs = {str(u[2]) for u in seg.get_source_image_uids()} | {u for u, _ in frame_refs}
    refs.discard("")
    owners = sorted({imgs.owner[u][0] for u in refs if u in imgs.owner})
    where = f"site '{site}': DICOM SEG '{path}'"
    if not owners:
        raise DataError(f"{where} references none of the image volumes in '{image_dir}'")
    if len(owners) > 1:
        raise DataError(f"{where} references images of {len(owners)} volumes ({', '.join(owners[:4])}); "
                        "a SEG segments one series")
    name = owners[0]
    missing = refs - imgs.uids[name]
    if missing and name not in imgs.broken:
        raise DataError(f"{where} references {len(missing)} instance(s) that are not in '{images[name]}'")
    if name in imgs.frames:
        n = imgs.frames[name]
        bad = [fr for u, fr in frame_refs if u in imgs.uids[name] and (not fr or max(fr) > n)]
        if bad:
            raise DataError(f"{where}: {len(bad)} frame(s) do not name a frame 1..{n} of the multi-frame image "
                            f"'{images[name]}'")
    return name


def match_seg_masks(images: dict[str, Path], image_dir: Path, masks: Path, site: str,
                    segments: dict[int, list] | None, num_classes: int, skip: bool,
                    ) -> tuple[list[SegMatch], list[tuple[str, str, str]]]:
    """The SEGs of ``masks`` matched to the image volumes ``images`` (name -> series
    folder or file) by the SOP instances they reference, sorted by name; and, under
    ``skip``, the volumes left out as (name, file, reason). See the module docstring."""
    if not images:
        raise DataError(f"site '{site}': no image volumes in '{image_dir}'")
    imgs = _image_instances(images, site, skip)
    segs, bad_segs, other = _seg_files(masks, site, skip)
    if not segs and not bad_segs:
        others = f" ({other} DICOM file(s) of other classes)" if other else ""
        raise DataError(f"site '{site}': no DICOM SEG files (SOP Class Segmentation Storage) in '{masks}'{others}")
    by_name: dict[str, SegMatch] = {}
    for path, ds in segs:
        try:
            seg = _seg_header(path, ds, site)
            name = _match_one(path, seg, imgs, images, image_dir, site)
            classes = _classes(seg, path, site, segments, num_classes)
        except UnreadableFile as e:
            if not skip:
                raise
            bad_segs.append((path, e.reason))
            continue
        if name in by_name:
            raise DataError(f"site '{site}': DICOM SEGs '{by_name[name].seg}' and '{path}' both segment "
                            f"'{images[name]}'; one SEG per series")
        by_name[name] = SegMatch(name, path, classes)
    refused = [(n, str(f), reason) for n, (f, reason) in sorted(imgs.broken.items())]
    lonely = sorted(n for n in images if n not in by_name and n not in imgs.broken)
    if lonely and skip and len(lonely) <= len(bad_segs):
        reason = f"no readable DICOM SEG references it; {len(bad_segs)} SEG file(s) in '{masks}' cannot be read"
        refused += [(n, str(images[n]), reason) for n in lonely]
    elif lonely:
        raise DataError(f"site '{site}': image volumes without a DICOM SEG: {', '.join(images[n].name for n in lonely)} "
                        f"(in '{image_dir}' and '{masks}')")
    refused += [(str(p.relative_to(masks)), str(p), reason) for p, reason in bad_segs]
    matches = [by_name[n] for n in sorted(by_name) if n not in imgs.broken]
    return matches, refused


# --------------------------------------------------------------------------- reading


def read_seg_labels(path: Path, refs: list[tuple[str, int | None]], shape: tuple[int, ...],
                    classes: tuple[tuple[int, int], ...], site: str, source: Path) -> np.ndarray:
    """int64 class indices of ``shape`` (slices, rows, cols) from the SEG at ``path``:
    slice i segments ``refs[i]`` (SOP Instance UID, and frame number for a multi-frame
    image, else None). See the module docstring."""
    import highdicom as hd
    import pydicom

    if not Path(path).is_file():
        raise DataError(f"site '{site}': '{path}' not found")
    with _quiet():
        ds = None
        target = np.zeros(shape, dtype=np.int64)
        try:
            ds = pydicom.dcmread(str(path))
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
            kw = dict(combine_segments=False, assert_missing_frames_are_empty=True, ignore_spatial_locations=True,
                      dtype=np.float32 if fractional else np.uint8)
            for number, cls in sorted(classes, key=lambda c: (c[1], c[0])):  # the higher class is written last
                if refs[0][1] is None:
                    pixels = seg.get_pixels_by_source_instance(
                        source_sop_instance_uids=[u for u, _ in refs], segment_numbers=[number], **kw)
                else:
                    pixels = seg.get_pixels_by_source_frame(
                        source_sop_instance_uid=refs[0][0], source_frame_numbers=[int(f) for _, f in refs],
                        segment_numbers=[number], **kw)
                pixels = pixels[..., 0]
                if pixels.shape != tuple(shape):
                    raise DataError(f"site '{site}': DICOM SEG '{path}' has frames of {pixels.shape[1:]} pixels but the "
                                    f"images of '{source}' are {tuple(shape[1:])}")
                target[pixels >= 0.5 if fractional else pixels > 0] = cls
        except DataError:
            raise
        except Exception as e:  # damaged or truncated file, undecodable frames: highdicom and pydicom raise many types
            raise UnreadableFile(site, path, f"not a readable DICOM SEG ({_reason(e, ds)})") from None
    return target
