"""Read TensorBoard event files back without TensorBoard: the TFRecord framing (length, masked
CRC-32C of the length, payload, masked CRC-32C of the payload), both checksums verified, and the
payload parsed as an ``Event`` protocol buffer."""

import struct
from pathlib import Path

from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list[Event]:
    data, events, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
        assert length_crc == _masked_crc(header), f"{path}: bad length checksum at byte {pos}"
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert payload_crc == _masked_crc(payload), f"{path}: bad payload checksum at byte {pos}"
        events.append(Event.FromString(payload))
        pos += 16 + length
    return events


def scalars_and_images(logdir) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, bytes]]]:
    """``({tag: {step: value}}, {tag: {step: encoded PNG}})`` over every event file in ``logdir``."""
    scalars, images = {}, {}
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.HasField("image"):
                    images.setdefault(value.tag, {})[event.step] = value.image.encoded_image_string
    return scalars, images
