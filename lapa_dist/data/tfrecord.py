"""TFRecord files and ``tf.train.Example`` messages, read and written without TensorFlow.

A TFRecord file is a run of records, each ``length`` (uint64 LE), the masked CRC-32C of those 8
bytes, ``length`` data bytes and the masked CRC-32C of the data (docs: shared FORMATS.md section 1.4).
An Example maps feature names to one of three lists (section 1.5); decoded here as

    bytes_list -> list[bytes]
    float_list -> np.ndarray float32 [n]
    int64_list -> np.ndarray int64 [n]

CRC-32C comes from ``google-crc32c`` (C, hardware accelerated) when installed, else from a
table-driven pure-Python fallback that is correct but slow (about 10 MB/s).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np

MASK_DELTA = 0xA282EAD8
UINT32 = 0xFFFFFFFF
UINT64 = 0xFFFFFFFFFFFFFFFF
HEADER_BYTES = 12  # length (8) + its masked CRC (4)
FOOTER_BYTES = 4  # masked CRC of the data

# Protobuf wire types and the tf.train field numbers (Example.features = 1, Features.feature = 1,
# map entry key = 1 / value = 2, Feature.bytes_list / float_list / int64_list = 1 / 2 / 3, List.value = 1).
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
BYTES_LIST, FLOAT_LIST, INT64_LIST = 1, 2, 3

FeatureValue = list[bytes] | np.ndarray


class TFRecordError(ValueError):
    """A TFRecord file or Example message that cannot be read; the message names where."""


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # reflected Castagnoli polynomial
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c_python(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, byte at a time; the fallback when google-crc32c is absent."""
    table = _CRC32C_TABLE
    crc = UINT32
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ UINT32


try:
    from google_crc32c import value as _crc32c_native
except ImportError:  # pragma: no cover - depends on the environment
    _crc32c_native = None


def crc32c(data: bytes) -> int:
    if _crc32c_native is not None:
        return _crc32c_native(bytes(data))
    return crc32c_python(data)


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & UINT32) + MASK_DELTA) & UINT32


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(byte offset, data) of every record in the file, checking both CRCs of each."""
    with open(path, "rb") as handle:
        offset = 0
        while True:
            header = handle.read(HEADER_BYTES)
            if not header:
                return
            if len(header) < HEADER_BYTES:
                raise TFRecordError(f"{path}: truncated record header at offset {offset}")
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{path}: corrupt record length at offset {offset} (CRC mismatch)")
            data = handle.read(length)
            footer = handle.read(FOOTER_BYTES)
            if len(data) < length or len(footer) < FOOTER_BYTES:
                raise TFRecordError(
                    f"{path}: truncated record at offset {offset} (expected {length} data bytes and a CRC)"
                )
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                raise TFRecordError(f"{path}: corrupt record data at offset {offset} (CRC mismatch)")
            yield offset, data
            offset += HEADER_BYTES + length + FOOTER_BYTES


def count_records(path: str | os.PathLike) -> int:
    """Records in the file, found by seeking over the framing (length CRCs checked, data not read)."""
    size = os.path.getsize(path)
    count = offset = 0
    with open(path, "rb") as handle:
        while offset < size:
            header = handle.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES or masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                raise TFRecordError(f"{path}: corrupt or truncated record header at offset {offset}")
            record_end = offset + HEADER_BYTES + struct.unpack("<Q", header[:8])[0] + FOOTER_BYTES
            if record_end > size:
                raise TFRecordError(f"{path}: truncated record at offset {offset}")
            offset = record_end
            handle.seek(offset)
            count += 1
    return count


def frame_record(data: bytes) -> bytes:
    """One record with its TFRecord framing."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> None:
    with open(path, "wb") as handle:
        handle.writelines(frame_record(data) for data in records)


# ----------------------------------------------------------------------------- protobuf decoding


def _read_varint(buffer: memoryview, position: int, end: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``position``; values wrap to 64 bits like protobuf."""
    value = shift = 0
    while position < end:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & UINT64, position
        shift += 7
        if shift >= 70:
            break
    raise TFRecordError(f"malformed varint ending at byte {position}")


def _iter_fields(buffer: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of a message; value is an int for varint and
    fixed-width fields (raw bits) and a memoryview for length-delimited ones."""
    position, end = 0, len(buffer)
    while position < end:
        tag, position = _read_varint(buffer, position, end)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == VARINT:
            value, position = _read_varint(buffer, position, end)
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if position + width > end:
                raise TFRecordError(f"field {number}: truncated fixed-width value at byte {position}")
            value = int.from_bytes(buffer[position : position + width], "little")
            position += width
        elif wire_type == LENGTH_DELIMITED:
            length, position = _read_varint(buffer, position, end)
            if position + length > end:
                raise TFRecordError(f"field {number}: length {length} runs past the message end")
            value = buffer[position : position + length]
            position += length
        else:
            raise TFRecordError(f"field {number}: unsupported wire type {wire_type} at byte {position}")
        yield number, wire_type, value


def decode_packed_varints(data: memoryview | bytes) -> np.ndarray:
    """int64 [n] from packed varints, vectorised; negative numbers are 10-byte two's complement."""
    raw = np.frombuffer(data, np.uint8)
    if raw.size == 0:
        return np.zeros(0, np.int64)
    if raw[-1] >= 0x80:
        raise TFRecordError("packed int64 list ends inside a varint")
    is_last = raw < 0x80
    value_index = np.concatenate([[0], np.cumsum(is_last[:-1])])  # [bytes] which value each byte is in
    starts = np.flatnonzero(np.concatenate([[True], is_last[:-1]]))
    byte_in_value = np.arange(raw.size) - starts[value_index]
    if byte_in_value.max() > 9:
        raise TFRecordError("packed int64 list holds a varint longer than 10 bytes")
    groups = (raw & 0x7F).astype(np.uint64) << (7 * byte_in_value).astype(np.uint64)
    return np.bitwise_or.reduceat(groups, starts).view(np.int64)


def _decode_float_list(message: memoryview) -> np.ndarray:
    parts = []
    for number, wire_type, value in _iter_fields(message):
        if number != 1:
            continue
        if wire_type == LENGTH_DELIMITED:
            if len(value) % 4:
                raise TFRecordError(f"packed float list of {len(value)} bytes is not a multiple of 4")
            parts.append(np.frombuffer(value, "<f4"))
        elif wire_type == FIXED32:
            parts.append(np.array([value], np.uint32).view(np.float32))
        else:
            raise TFRecordError(f"float list value with wire type {wire_type}")
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def _decode_int64_list(message: memoryview) -> np.ndarray:
    parts = []
    for number, wire_type, value in _iter_fields(message):
        if number != 1:
            continue
        if wire_type == LENGTH_DELIMITED:
            parts.append(decode_packed_varints(value))
        elif wire_type == VARINT:
            parts.append(np.array([value], np.uint64).view(np.int64))
        else:
            raise TFRecordError(f"int64 list value with wire type {wire_type}")
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _decode_bytes_list(message: memoryview) -> list[bytes]:
    values = []
    for number, wire_type, value in _iter_fields(message):
        if number == 1:
            if wire_type != LENGTH_DELIMITED:
                raise TFRecordError(f"bytes list value with wire type {wire_type}")
            values.append(bytes(value))
    return values


_LIST_DECODERS = {BYTES_LIST: _decode_bytes_list, FLOAT_LIST: _decode_float_list, INT64_LIST: _decode_int64_list}


def _decode_feature(message: memoryview) -> FeatureValue:
    """The Feature's list; a Feature with no list set decodes as an empty list of bytes."""
    decoded: FeatureValue = []
    for number, wire_type, value in _iter_fields(message):
        if number in _LIST_DECODERS and wire_type == LENGTH_DELIMITED:
            decoded = _LIST_DECODERS[number](value)  # a oneof: the last one set wins
    return decoded


def _decode_map_entry(entry: memoryview) -> tuple[str, FeatureValue]:
    key, feature = "", memoryview(b"")
    for number, wire_type, value in _iter_fields(entry):
        if number == 1 and wire_type == LENGTH_DELIMITED:
            key = bytes(value).decode("utf-8")
        elif number == 2 and wire_type == LENGTH_DELIMITED:
            feature = value
    return key, _decode_feature(feature)


def parse_example(data: bytes) -> dict[str, FeatureValue]:
    """Decode a serialized ``tf.train.Example`` into {feature name: values}."""
    features: dict[str, FeatureValue] = {}
    for number, wire_type, example_field in _iter_fields(memoryview(data)):
        if number != 1 or wire_type != LENGTH_DELIMITED:
            continue
        for entry_number, entry_wire_type, entry in _iter_fields(example_field):
            if entry_number == 1 and entry_wire_type == LENGTH_DELIMITED:
                key, value = _decode_map_entry(entry)
                features[key] = value
    return features


# ----------------------------------------------------------------------------- protobuf encoding


def encode_varint(value: int) -> bytes:
    """Protobuf varint of ``value``; negative values become 10-byte two's complement."""
    value &= UINT64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def encode_feature(values: FeatureValue) -> bytes:
    """A Feature message: bytes -> BytesList, floating arrays -> FloatList, integer or bool arrays
    -> Int64List (packed, as TensorFlow writes them)."""
    if isinstance(values, list) and all(isinstance(v, (bytes, bytearray)) for v in values):
        return encode_field(BYTES_LIST, b"".join(encode_field(1, bytes(v)) for v in values))
    array = np.asarray(values).ravel()
    if np.issubdtype(array.dtype, np.floating):
        return encode_field(FLOAT_LIST, encode_field(1, array.astype("<f4").tobytes()))
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        packed = b"".join(encode_varint(int(v)) for v in array.astype(np.int64))
        return encode_field(INT64_LIST, encode_field(1, packed))
    raise TypeError(f"cannot store {array.dtype} values in a tf.train.Feature")


def encode_example(features: dict[str, FeatureValue]) -> bytes:
    """Serialize {feature name: values} as a ``tf.train.Example``."""
    entries = b"".join(
        encode_field(1, encode_field(1, key.encode("utf-8")) + encode_field(2, encode_feature(values)))
        for key, values in features.items()
    )
    return encode_field(1, entries)
