"""What a NIfTI header declares, checked before the voxel data is read: no file can make the
reader allocate more than its header declares, and no header can declare more than a limit.

- `DEFAULT_MAX_VOXELS` (512 x 512 x 2048 = 1024 x 1024 x 512, 2.1 GB as float32) bounds the
  declared voxel count; a header over it is refused before anything is allocated. Segmenting
  takes about 8 bytes per voxel at its peak (the image as float, the resized slices, the
  labels), so the limit keeps a volume within about 4 GB; a larger scan needs --max-voxels.
  (At 1024 x 1024 x 2048 a 3 MB gzip of zeros declaring 1024 x 1024 x 1536 was read whole, at
  a 12.4 GB peak, before the plausibility check refused it.)
- A .nii.gz is decompressed incrementally and never past the size its header declares (header
  + extensions + voxels): a gzip bomb behind a small header stops at the first byte too many.
- The data must be exactly as long as declared: a shorter file is truncated, a longer one holds
  something the header does not describe; both are refused.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

DEFAULT_MAX_VOXELS = 512 * 512 * 2048
MAX_EXTENSION_BYTES = 16 << 20          # header extensions (DICOM tags, JSON sidecars) are kB, not GB
_CHUNK = 4 << 20


@dataclass(frozen=True)
class Declared:
    klass: type                 # nib.Nifti1Image or nib.Nifti2Image
    shape: tuple
    dtype: np.dtype
    offset: int                 # where the voxel data starts
    voxels: int

    @property
    def total_bytes(self) -> int:
        return self.offset + self.voxels * self.dtype.itemsize


def _header_size(prefix: bytes) -> tuple[int | None, str]:
    if len(prefix) < 4:
        return None, "<"
    for order, endian in (("little", "<"), ("big", ">")):
        size = int.from_bytes(prefix[:4], order)
        if size in (348, 540):
            return size, endian
    return None, "<"


def declared(prefix: bytes, path, max_voxels: int | None) -> Declared:
    """The layout the header at the start of `prefix` declares; InputError naming `path` when it
    is no NIfTI header or declares more than `max_voxels` voxels."""
    size, _ = _header_size(prefix)
    if size is None or len(prefix) < size:
        if len(prefix) < 348:
            raise InputError(f"{path}: truncated or corrupt: {len(prefix)} bytes, shorter than a NIfTI header (348)")
        raise InputError(f"{path}: not a NIfTI file")
    klass = nib.Nifti1Image if size == 348 else nib.Nifti2Image
    header_class = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    try:
        # the header alone (extension flag cleared): shape, dtype and offset, nothing read beyond it
        hdr = header_class.from_fileobj(_BytesReader(prefix[:size] + b"\0\0\0\0"), check=False)
        shape = tuple(int(v) for v in hdr.get_data_shape())
        dtype = np.dtype(hdr.get_data_dtype())
        offset = int(hdr["vox_offset"])
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, KeyError on hostile headers
        raise InputError(f"{path}: unreadable or corrupt NIfTI header ({type(exc).__name__}: {exc})") from exc
    if any(n < 0 for n in shape):
        raise InputError(f"{path}: the header declares a negative dimension {shape}")
    voxels = 1
    for n in shape:
        voxels *= n
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(f"{path}: the header declares {'x'.join(map(str, shape))} = {voxels:,} voxels, more than "
                         f"the limit of {max_voxels:,} (max_voxels / --max-voxels); refused before reading")
    if offset < size + 4:
        raise InputError(f"{path}: vox_offset {offset} puts the voxel data inside the header (a single-file "
                         f"NIfTI needs at least {size + 4}); refused rather than reading the header as voxels")
    if offset - size - 4 > MAX_EXTENSION_BYTES:
        raise InputError(f"{path}: the header puts the voxel data {offset:,} bytes in (over "
                         f"{MAX_EXTENSION_BYTES:,} bytes of header extensions)")
    return Declared(klass, shape, dtype, offset, voxels)


class _BytesReader:
    """The minimal file object nibabel's header reader needs, over bytes (no copy)."""

    def __init__(self, data: bytes):
        self._data, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n is None or n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos:end])
        self._pos = end
        return out

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else len(self._data) + pos)
        return self._pos


def check_uncompressed(path: Path, max_voxels: int | None) -> Declared:
    """A .nii file: header limits, then its size against what the header declares."""
    with open(path, "rb") as fh:
        prefix = fh.read(540)
    layout = declared(prefix, path, max_voxels)
    size = path.stat().st_size
    if size < layout.total_bytes:
        raise InputError(f"{path}: truncated or corrupt voxel data: {size:,} bytes, the header declares "
                         f"{layout.total_bytes:,} ({'x'.join(map(str, layout.shape))} {layout.dtype})")
    if size > layout.total_bytes:
        raise InputError(f"{path}: {size - layout.total_bytes:,} bytes after the voxel data its header declares "
                         f"({'x'.join(map(str, layout.shape))} {layout.dtype}, {layout.total_bytes:,} bytes): "
                         "not a well-formed NIfTI file")
    return layout


def _decompressor():
    try:
        from isal import isal_zlib
        return isal_zlib.decompressobj, (zlib.error, isal_zlib.error)
    except ImportError:  # pragma: no cover - isal is a base dependency
        return zlib.decompressobj, (zlib.error,)


def read_gzip_bounded(path: Path, max_voxels: int | None) -> tuple[bytes, Declared]:
    """Decompress a .nii.gz, never past the bytes its header declares; (bytes, layout).

    Fast path (one gzip member, the usual case): the header is inflated from the first 64 kB and
    checked, then the file is inflated in one call capped at the declared size + 1 byte. Several
    members (concatenated gzip files) take the incremental path."""
    make, zerrors = _decompressor()
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        d = make(wbits=31)
        prefix = d.decompress(head, 540)
        if len(prefix) < 540 and not d.eof:
            return _read_gzip_incremental(path, max_voxels)   # a header spread over many tiny blocks
        layout = declared(prefix, path, max_voxels)
        size = path.stat().st_size
        if size > layout.total_bytes * 1.01 + (1 << 20):     # deflate never grows data by 1 %
            raise InputError(f"{path}: {size:,} compressed bytes cannot hold only the {layout.total_bytes:,} bytes "
                             f"its header declares ({'x'.join(map(str, layout.shape))} {layout.dtype}); refused")
        d = make(wbits=31)
        raw = d.decompress(path.read_bytes(), layout.total_bytes + 1)
        if len(raw) <= layout.total_bytes and not d.eof and d.unconsumed_tail:
            raw += d.decompress(d.unconsumed_tail, layout.total_bytes + 1 - len(raw))   # the trailer
        if d.eof and d.unused_data:
            return _read_gzip_incremental(path, max_voxels)
    except zerrors as exc:
        raise InputError(f"{path}: truncated or corrupt gzip stream ({type(exc).__name__}: {exc})") from exc
    except (EOFError, OSError) as exc:
        raise InputError(f"{path}: truncated or corrupt gzip stream ({type(exc).__name__}: {exc})") from exc
    if len(raw) > layout.total_bytes:
        raise InputError(f"{path}: the gzip stream holds more than the {layout.total_bytes:,} bytes its header "
                         f"declares ({'x'.join(map(str, layout.shape))} {layout.dtype}); refused (a decompression "
                         "bomb or a corrupt file)")
    if not d.eof:
        raise InputError(f"{path}: truncated or corrupt gzip stream (it ends after {len(raw):,} bytes of "
                         f"{layout.total_bytes:,} declared)")
    if len(raw) < layout.total_bytes:
        raise InputError(f"{path}: truncated or corrupt voxel data: {len(raw):,} bytes decompressed, the header "
                         f"declares {layout.total_bytes:,}")
    return raw, layout


def _read_gzip_incremental(path: Path, max_voxels: int | None) -> tuple[bytes, Declared]:
    """Like read_gzip_bounded, member by member and chunk by chunk (any number of gzip members)."""
    make, zerrors = _decompressor()
    chunks: list[bytes] = []
    have = 0
    layout: Declared | None = None
    try:
        with open(path, "rb") as fh:
            d = make(wbits=31)
            pending = b""
            file_done = False
            while True:
                if not pending and not file_done:
                    pending = fh.read(_CHUNK)
                    file_done = not pending
                if not pending:
                    if not d.eof:
                        raise InputError(f"{path}: truncated or corrupt gzip stream (it ends after {have:,} "
                                         f"bytes{'' if layout is None else f' of {layout.total_bytes:,} declared'})")
                    break
                cap = (layout.total_bytes - have + 1) if layout is not None else max(540 - have, 1)
                out = d.decompress(pending, cap)
                pending = d.unconsumed_tail
                if out:
                    chunks.append(out)
                    have += len(out)
                if d.eof:                              # a gzip member ended; another may follow
                    pending = d.unused_data + pending
                    if pending or not file_done:
                        d = make(wbits=31)
                        if not pending:
                            pending = fh.read(_CHUNK)
                            file_done = not pending
                            if not pending:
                                break
                    else:
                        break
                if layout is None and have >= 540:
                    layout = declared(b"".join(chunks)[:540], path, max_voxels)
                if layout is not None and have > layout.total_bytes:
                    raise InputError(f"{path}: the gzip stream holds more than the {layout.total_bytes:,} bytes its "
                                     f"header declares ({'x'.join(map(str, layout.shape))} {layout.dtype}); "
                                     "refused (a decompression bomb or a corrupt file)")
    except zerrors as exc:
        raise InputError(f"{path}: truncated or corrupt gzip stream ({type(exc).__name__}: {exc})") from exc
    except (EOFError, OSError) as exc:
        raise InputError(f"{path}: truncated or corrupt gzip stream ({type(exc).__name__}: {exc})") from exc
    raw = b"".join(chunks)
    if layout is None:
        layout = declared(raw, path, max_voxels)       # a stream shorter than 540 bytes: names why
    if len(raw) < layout.total_bytes:
        raise InputError(f"{path}: truncated or corrupt voxel data: {len(raw):,} bytes decompressed, the header "
                         f"declares {layout.total_bytes:,}")
    return raw, layout
