"""A minimal zip writer for hostile archives that :mod:`zipfile` will not write.

Python's writer cannot copy a precomputed deflate stream, so a zip bomb would cost a real
4 GB compression (7-15 s) per archive. Here a member may be given as such a stream, built
once per process in milliseconds; members may also share a name (the duplicate-member case),
and ordinary members are stored uncompressed, as torch writes them.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s4B4H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_STORED, _DEFLATED = 0, 8
_DOS_DATE = (2024 - 1980) << 9 | 1 << 5 | 1  # 2024-01-01, 00:00

_BLOCK = 1 << 20
#: What a bomb member inflates to: 4000 MiB of zeros, just under zip's 32-bit size limit.
BOMB_BYTES = 4000 * _BLOCK


@dataclass(frozen=True)
class Member:
    """One zip entry: `data` stored as is, or `deflated` (a raw deflate stream) that inflates
    to `size` bytes with checksum `crc`."""

    name: str
    data: bytes = b""
    deflated: bytes | None = None
    size: int = 0
    crc: int = 0


@functools.lru_cache(maxsize=None)
def _zero_bomb_stream() -> tuple[bytes, int]:
    """A raw deflate stream of BOMB_BYTES zeros (~4 MB) and its CRC-32.

    After a full flush deflate forgets its history, so every 1 MiB block of zeros compresses
    to the same bytes: one block is compressed and repeated.
    """
    zeros = bytes(_BLOCK)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty last block
    crc = 0
    for _ in range(BOMB_BYTES // _BLOCK):
        crc = zlib.crc32(zeros, crc)
    return block * (BOMB_BYTES // _BLOCK) + final, crc


def zero_bomb(name: str, prefix: bytes = b"") -> Member:
    """A member that inflates to `prefix` and 4000 MiB of zeros from about 4 MB (a prefix such
    as an .npy header makes the zeros a well-formed array)."""
    stream, crc = _zero_bomb_stream()
    if not prefix:
        return Member(name, deflated=stream, size=BOMB_BYTES, crc=crc)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    return Member(name, deflated=head + stream, size=len(prefix) + BOMB_BYTES,
                  crc=_crc_after(prefix))


@functools.lru_cache(maxsize=None)
def _crc_after(prefix: bytes) -> int:
    """CRC-32 of `prefix` followed by BOMB_BYTES zeros, a block at a time."""
    zeros, crc = bytes(_BLOCK), zlib.crc32(prefix)
    for _ in range(BOMB_BYTES // _BLOCK):
        crc = zlib.crc32(zeros, crc)
    return crc


def write_zip(path: Path, members: list[Member]) -> Path:
    """Write `members` in order (duplicates kept) as a plain zip archive."""
    central: list[bytes] = []
    with path.open("wb") as out:
        for member in members:
            name = member.name.encode("utf-8")
            if member.deflated is not None:
                method, payload, size, crc = _DEFLATED, member.deflated, member.size, member.crc
            else:
                method, payload = _STORED, member.data
                size, crc = len(payload), zlib.crc32(payload)
            flags = 0x800 if not member.name.isascii() else 0
            offset = out.tell()
            out.write(_LOCAL.pack(b"PK\x03\x04", 20, flags, method, 0, _DOS_DATE, crc,
                                  len(payload), size, len(name), 0))
            out.write(name)
            out.write(payload)
            central.append(_CENTRAL.pack(b"PK\x01\x02", 20, 3, 20, 0, flags, method, 0,
                                         _DOS_DATE, crc, len(payload), size, len(name), 0, 0,
                                         0, 0, 0o644 << 16, offset) + name)
        start = out.tell()
        for entry in central:
            out.write(entry)
        out.write(_END.pack(b"PK\x05\x06", 0, 0, len(central), len(central),
                            out.tell() - start, start, 0))
    return path


def read_members(path: Path) -> list[Member]:
    """Every member of an existing archive, in order, as stored members (to edit and rewrite)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [Member(info.filename, archive.read(info)) for info in archive.infolist()]
