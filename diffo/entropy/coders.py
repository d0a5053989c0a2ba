"""Symbol coders: integer symbols, each with the index of its CDF table, to bytes and back.

A coder codes from the exact integer CDF tables a model stores (`CdfTables`, 16-bit precision, built once
by `update()` at training time), so encoder and decoder agree on every machine. Two coders exist (docs/bitstream.md):

- formats 2 and 3, `RangeCoder`: constriction's range coder (Rust, wheels for Windows, macOS and Linux on every
  supported Python); DiffO models write format 2, OSDiff models format 3, whose sub-streams may hold several
  chunks coded one after the other (`encode_chunks`, `chunk_decoder`).
- format 1, `CompressAIRansCoder`: CompressAI's rANS coder, kept only so that format-1 files still decode
  where CompressAI is installed; elsewhere it fails with a message saying so.

Both code a symbol the same way (CompressAI's convention): value = symbol - offset[table]; a value outside
[0, cdf_length - 2) is sent as the table's last ("escape") symbol followed by the value itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import MissingExtraError

__all__ = ["CdfTables", "SymbolCoder", "RangeCoder", "ChunkDecoder", "CompressAIRansCoder", "coder_for_format", "PRECISION"]

PRECISION = 16  # bits of the stored CDF tables
_NIBBLE_COUNTS = 17  # an escaped value takes 0..16 four-bit nibbles (64 bits)


@dataclass
class CdfTables:
    """The integer tables of one entropy model: cdfs [T, L] (rows padded), lengths [T] (used entries of each
    row, escape included), offsets [T] (the symbol value of each row's first entry)."""

    cdfs: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    _pmfs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_buffers(cls, quantized_cdf, cdf_length, offset) -> "CdfTables":
        def arr(t):
            return np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.int64)

        cdfs, lengths, offsets = arr(quantized_cdf), arr(cdf_length).reshape(-1), arr(offset).reshape(-1)
        if cdfs.ndim != 2 or cdfs.shape[0] == 0 or not len(lengths) == len(offsets) == cdfs.shape[0]:
            raise ValueError(f"invalid CDF tables: cdfs {cdfs.shape}, lengths {lengths.shape}, offsets {offsets.shape}"
                             " (were the entropy tables built with update()?)")
        if lengths.min() < 3 or lengths.max() > cdfs.shape[1]:
            raise ValueError("invalid CDF tables: a row length is out of range")
        return cls(cdfs, lengths, offsets)

    @property
    def num_tables(self) -> int:
        return len(self.lengths)

    def pmf(self, t: int) -> np.ndarray:
        """Probabilities of table t's alphabet (values 0..L-3, then escape), exact multiples of 2^-16."""
        if t not in self._pmfs:
            counts = np.diff(self.cdfs[t, : self.lengths[t]])
            if counts.min() <= 0:
                raise ValueError(f"CDF table {t} is not strictly increasing")
            self._pmfs[t] = counts.astype(np.float64) / float(1 << PRECISION)
        return self._pmfs[t]


def _check_indexes(indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    idx = np.asarray(indexes, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= tables.num_tables):
        raise ValueError(f"CDF table index out of range 0..{tables.num_tables - 1}")
    return idx


class SymbolCoder:
    """Interface: `encode(symbols, indexes, tables) -> bytes`, `decode(data, indexes, tables) -> symbols`.
    `symbols` and `indexes` are flat integer arrays of equal length; the decoder knows `indexes`."""

    format_version: int
    name: str

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        raise NotImplementedError


class RangeCoder(SymbolCoder):
    """Format 2: constriction's range coder (32-bit words, 24-bit model precision).

    Order of the coded data (the decoder knows every symbol's table before it decodes it):
      1. for each table t in increasing order, the symbols whose index is t, in raster order, each as its
         value in 0..L_t-3 or the escape L_t-2, with table t's probabilities (exact 16-bit counts, which
         constriction maps onto its 24-bit grid deterministically, `perfect=False`);
      2. for each escaped symbol in raster order, its nibble count n in 0..16 (uniform), then
      3. all escaped symbols' nibbles, least significant first (uniform over 16), where an escaped value v is
         sent as 2|v|-1 below the range and 2(v - (L_t-2)) above it (CompressAI's mapping).
    The words are written little-endian and up to 3 trailing zero bytes of the last word are dropped (the
    decoder pads them back), so the stream costs whole bytes, not whole words.
    """

    format_version = 2
    name = "constriction range coder"

    def __init__(self):
        import constriction

        self._c = constriction

    def _model(self, tables: CdfTables, t: int):
        return self._c.stream.model.Categorical(tables.pmf(t), perfect=False)

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
        return self.encode_chunks([(symbols, indexes)], tables)

    def encode_chunks(self, chunks: list[tuple[np.ndarray, np.ndarray]], tables: CdfTables) -> bytes:
        """Several (symbols, indexes) chunks in one string, each coded as `encode` codes one, one after the
        other: for autoregressive models, where the decoder learns chunk k's tables only after decoding the
        chunks before it (`chunk_decoder`). One chunk gives exactly `encode`'s bytes."""
        prepared = []
        for symbols, indexes in chunks:
            sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
            idx = _check_indexes(indexes, tables)
            if sym.size != idx.size:
                raise ValueError(f"{sym.size} symbols but {idx.size} table indexes")
            if sym.size and np.abs(sym).max() >= 1 << 61:  # the escape mapping doubles values inside int64
                raise ValueError("a symbol is out of the coder's range (|s| < 2^61)")
            prepared.append((sym, idx))
        if not any(sym.size for sym, _ in prepared):
            return b""
        enc = self._c.stream.queue.RangeEncoder()
        for sym, idx in prepared:
            if sym.size:
                self._encode_into(enc, sym, idx, tables)
        return _words_to_bytes(enc.get_compressed())

    def _encode_into(self, enc, sym: np.ndarray, idx: np.ndarray, tables: CdfTables) -> None:
        escape = tables.lengths[idx] - 2
        value = sym - tables.offsets[idx]
        escaped = (value < 0) | (value >= escape)
        coded = np.where(escaped, escape, value).astype(np.int32)
        for t in np.unique(idx):
            enc.encode(coded[idx == t], self._model(tables, int(t)))
        if escaped.any():
            v, top = value[escaped], escape[escaped]
            raw = np.where(v < 0, -2 * v - 1, 2 * (v - top)).astype(np.uint64)
            counts = _nibble_counts(raw)
            enc.encode(counts.astype(np.int32), self._c.stream.model.Uniform(_NIBBLE_COUNTS))
            nibbles = np.concatenate([(r >> (4 * np.arange(n, dtype=np.uint64))) & 0xF for r, n in zip(raw, counts)])
            if nibbles.size:
                enc.encode(nibbles.astype(np.int32), self._c.stream.model.Uniform(16))

    def chunk_decoder(self, data: bytes, tables: CdfTables) -> "ChunkDecoder":
        """Reads what `encode_chunks` wrote, one chunk per `decode(indexes)` call, in the same order."""
        return ChunkDecoder(self, data, tables)

    def decode(self, data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        idx = _check_indexes(indexes, tables)
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        try:
            return self._decode(data, idx, tables)
        except (AssertionError, RuntimeError, OverflowError) as e:  # constriction's word for bytes it cannot read
            raise ValueError(f"the range-coded data is invalid ({e})") from None

    def _decode(self, data: bytes, idx: np.ndarray, tables: CdfTables) -> np.ndarray:
        return self._decode_from(self._c.stream.queue.RangeDecoder(_bytes_to_words(data)), idx, tables)

    def _decode_from(self, dec, idx: np.ndarray, tables: CdfTables) -> np.ndarray:
        out = np.empty(idx.size, dtype=np.int64)
        for t in np.unique(idx):
            sel = idx == t
            out[sel] = dec.decode(self._model(tables, int(t)), int(sel.sum()))
        escape = tables.lengths[idx] - 2
        escaped = out == escape
        if escaped.any():
            counts = np.asarray(dec.decode(self._c.stream.model.Uniform(_NIBBLE_COUNTS), int(escaped.sum())),
                                dtype=np.int64)
            nibbles = np.asarray(dec.decode(self._c.stream.model.Uniform(16), int(counts.sum())), dtype=np.uint64)
            ends = np.cumsum(counts)
            values = []
            for n, e, top in zip(counts, ends, escape[escaped]):
                raw = sum(int(d) << (4 * k) for k, d in enumerate(nibbles[e - n:e]))
                v = -(raw + 1) // 2 if raw & 1 else raw // 2 + int(top)
                if not -(1 << 62) <= v < (1 << 62):  # only forged streams get here
                    raise ValueError("escaped symbol out of range")
                values.append(v)
            out[escaped] = values
        return out + tables.offsets[idx]


class ChunkDecoder:
    """Decodes the chunks of one `RangeCoder.encode_chunks` string in order (see there)."""

    def __init__(self, coder: RangeCoder, data: bytes, tables: CdfTables):
        self._coder, self._tables = coder, tables
        self._dec = coder._c.stream.queue.RangeDecoder(_bytes_to_words(data))

    def decode(self, indexes: np.ndarray) -> np.ndarray:
        idx = _check_indexes(indexes, self._tables)
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        try:
            return self._coder._decode_from(self._dec, idx, self._tables)
        except (AssertionError, RuntimeError, OverflowError) as e:  # constriction's word for bytes it cannot read
            raise ValueError(f"the range-coded data is invalid ({e})") from None


def _nibble_counts(raw: np.ndarray) -> np.ndarray:
    counts = np.zeros(raw.shape, dtype=np.int64)
    r = raw.copy()
    while (r > 0).any():
        counts += r > 0
        r >>= np.uint64(4)
    return counts


def _words_to_bytes(words: np.ndarray) -> bytes:
    data = np.asarray(words, dtype="<u4").tobytes()
    cut = 0
    while cut < 3 and len(data) - cut > 0 and data[len(data) - 1 - cut] == 0:
        cut += 1
    return data[: len(data) - cut]


def _bytes_to_words(data: bytes) -> np.ndarray:
    data = bytes(data)
    data += b"\0" * (-len(data) % 4)
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


class CompressAIRansCoder(SymbolCoder):
    """Format 1: CompressAI's rANS coder (its C++ extension). Only for files of format 1: imported on first
    use, so the run-time path never needs CompressAI."""

    format_version = 1
    name = "CompressAI rANS"

    def __init__(self):
        try:
            from compressai import ans
        except ImportError as e:
            raise MissingExtraError(
                "this .diffo file is format 1, written with CompressAI's entropy coder, and CompressAI is not "
                "installed here. Decode it where CompressAI is installed (pip install \"comfyui-diffo[train]\", "
                "Linux or macOS with Python 3.10-3.12), or re-compress the original image with this version, "
                f"which writes format 2 ({e})") from None
        self._ans = ans

    def _args(self, indexes, tables):
        return (_check_indexes(indexes, tables).astype(np.int32).tolist(), tables.cdfs.astype(np.int32).tolist(),
                tables.lengths.astype(np.int32).tolist(), tables.offsets.astype(np.int32).tolist())

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
        sym = np.asarray(symbols, dtype=np.int64).reshape(-1)
        if sym.size and (sym.min() < -(2**31) or sym.max() >= 2**31):
            raise ValueError("symbol out of the 32-bit range of CompressAI's coder")
        return self._ans.RansEncoder().encode_with_indexes(sym.astype(np.int32).tolist(),
                                                          *self._args(indexes, tables))

    def decode(self, data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        return np.asarray(self._ans.RansDecoder().decode_with_indexes(bytes(data), *self._args(indexes, tables)),
                          dtype=np.int64)


_CODERS = {3: RangeCoder, 2: RangeCoder, 1: CompressAIRansCoder}


def coder_for_format(version: int) -> SymbolCoder:
    """The coder that reads and writes the sub-streams of `.diffo` format `version`."""
    if version not in _CODERS:
        raise ValueError(f"no entropy coder for .diffo format {version}")
    return _CODERS[version]()
