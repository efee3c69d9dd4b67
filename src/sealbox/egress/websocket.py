"""WebSocket frames, re-framed with a rewritten payload (sans-I/O).

After an upgrade the gateway still substitutes placeholders (client→server) and redacts values
(server→client). Client frames are masked, and a new payload can change length, so a raw byte
scan would neither find placeholders nor keep framing intact: each data frame is decoded,
its payload transformed, and encoded again. Control frames pass unchanged. A value split
across two frames is not caught (documented limitation); compression is negotiated away.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

MAX_FRAME = 16 << 20


class FrameError(Exception):
    pass


def _xor(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    n = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return n.to_bytes(len(payload), "big")


def encode_frame(first: int, payload: bytes, mask: bytes | None) -> bytes:
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n < 1 << 16:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + _xor(payload, mask)


class FrameRewriter:
    """Feed raw bytes of one direction; get bytes with each data frame's payload transformed."""

    def __init__(self, transform: Callable[[bytes], bytes]) -> None:
        self._transform = transform
        self._buf = b""

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out: list[bytes] = []
        while True:
            frame = self._next()
            if frame is None:
                return b"".join(out)
            out.append(frame)

    def _next(self) -> bytes | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        length, pos = second & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            length, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        if length > MAX_FRAME:
            raise FrameError(f"WebSocket frame of {length} bytes is over the gateway's limit")
        mask = None
        if second & 0x80:
            if len(buf) < pos + 4:
                return None
            mask, pos = buf[pos:pos + 4], pos + 4
        if len(buf) < pos + length:
            return None
        payload = buf[pos:pos + length]
        self._buf = buf[pos + length:]
        if first & 0x0F >= 8:  # control frame
            return buf[:pos + length]
        if first & 0x70:
            raise FrameError("compressed or extended WebSocket frames cannot be inspected")
        plain = _xor(payload, mask) if mask is not None else payload
        return encode_frame(first, self._transform(plain), mask)
