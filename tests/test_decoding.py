"""Incremental Content-Encoding decoders: every encoding, chunking, errors, bombs."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest
import zstandard

from spendtap.metering.decoding import PIECE_SIZE, DecodeError, make_decoder
from tests.corpus_cases import ENCODINGS, chunked, encode

SAMPLE = b"data: " + os.urandom(2000).hex().encode() + b"\n\n" + b"data: [DONE]\n\n" * 50


def decode_all(data: bytes, header: str | None, size: int) -> bytes:
    d = make_decoder(header)
    out = [d.decode(c) for c in chunked(data, size)]
    out.append(d.flush())
    return b"".join(out)


@pytest.mark.parametrize("size", [1, 5, 4096, 1 << 20])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_roundtrip_in_chunks(encoding, size):
    """Each supported encoding decodes back to the original, whatever the chunk size."""
    data, header = encode(SAMPLE, encoding)
    assert decode_all(data, header, size) == SAMPLE


@pytest.mark.parametrize("header", [None, "", "identity", " Identity "])
def test_identity(header):
    """No header, an empty one or identity pass bytes through unchanged."""
    assert decode_all(SAMPLE, header, 100) == SAMPLE


def test_header_is_case_and_space_insensitive():
    """Encoding names are matched case-insensitively, with spaces around commas."""
    data = brotli.compress(gzip.compress(SAMPLE))
    assert decode_all(data, " GZIP ,BR ", 7) == SAMPLE


def test_multi_member_gzip():
    """Concatenated gzip members decode as one body."""
    data = gzip.compress(SAMPLE[:1000]) + gzip.compress(SAMPLE[1000:])
    assert decode_all(data, "gzip", 13) == SAMPLE


def test_multi_frame_zstd():
    """Concatenated zstd frames decode as one body."""
    c = zstandard.ZstdCompressor()
    data = c.compress(SAMPLE[:1000]) + c.compress(SAMPLE[1000:])
    assert decode_all(data, "zstd", 13) == SAMPLE


def test_trailing_garbage_after_gzip_is_ignored():
    """Bytes after the end of a gzip stream (padding) do not break decoding."""
    assert decode_all(gzip.compress(SAMPLE) + b"\0\0junk", "gzip", 64) == SAMPLE


def test_deflate_detects_zlib_or_raw():
    """deflate accepts the zlib-wrapped form (RFC 9110) and raw deflate (common in practice)."""
    raw = zlib.compressobj(wbits=-15)
    raw_data = raw.compress(SAMPLE) + raw.flush()
    assert decode_all(zlib.compress(SAMPLE), "deflate", 1) == SAMPLE
    assert decode_all(raw_data, "deflate", 1) == SAMPLE


@pytest.mark.parametrize("header", ["compress", "gzip, foo", "sdch"])
def test_unknown_encoding_raises(header):
    """An unknown encoding raises DecodeError (the scanner then stops scanning that body)."""
    with pytest.raises(DecodeError):
        make_decoder(header)


@pytest.mark.parametrize("header", ["gzip", "deflate", "br", "zstd"])
def test_corrupt_data_raises(header):
    """Corrupt compressed data raises DecodeError, never another exception."""
    data, _ = encode(SAMPLE, header)
    bad = data[:10] + bytes(b ^ 0x5A for b in data[10:60]) + data[60:]
    d = make_decoder(header)
    with pytest.raises(DecodeError):
        for c in chunked(bad, 16):
            d.decode(c)
        d.flush()


@pytest.mark.parametrize("header", ["gzip", "deflate", "br", "zstd"])
def test_bomb_is_decoded_in_bounded_pieces(header):
    """A small body that inflates to 64 MiB comes out in bounded pieces, never all at once."""
    size = 64 << 20
    zeros = b"\0" * size
    data, _ = encode(zeros, header)
    del zeros
    assert len(data) < size // 500
    d = make_decoder(header)
    total = 0
    biggest = 0
    for c in chunked(data, 1 << 16):
        for piece in d.iter_decode(c):
            total += len(piece)
            biggest = max(biggest, len(piece))
    for piece in d.iter_flush():
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == size
    # zlib and brotli honour the piece size (brotli may overshoot by an internal buffer);
    # zstd is bounded by input slicing (see decoding.py).
    bound = {"gzip": PIECE_SIZE, "deflate": PIECE_SIZE, "br": 4 * PIECE_SIZE, "zstd": 8 << 20}
    assert biggest <= bound[header]


@pytest.mark.parametrize("header", ["gzip", "zstd"])
def test_member_boundary_on_chunk_boundary(header):
    """A second gzip member or zstd frame starting exactly at a chunk boundary is decoded."""
    first, _ = encode(SAMPLE[:1000], header)
    second, _ = encode(SAMPLE[1000:], header)
    d = make_decoder(header)
    out = d.decode(first) + d.decode(second[:1]) + d.decode(second[1:]) + d.flush()
    assert out == SAMPLE
