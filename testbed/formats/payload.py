"""The payload netperf sends: a random fill file and a wide send ring, and their provenance.

netperf fills its ring of `send_width` buffers once (netlib.c
`allocate_buffer_ring`: the repeating string "netperf" by default, or the fill
file read sequentially, rewound at its end) and then sends the ring over and over,
so the byte stream repeats every `send_width x send_size` bytes (32 KiB by
default for TCP_STREAM). Anything that notices writes by a change of content (the
cache model's device-write detection) misses every line whose new bytes equal the
old. A random fill file at least as long as a wide ring makes the period long
against the receiver's buffer rings.

Raw file: `payload.json` in each repetition, the provenance (file, size, sha256,
ring width and period) as the sending guest reported it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass

from testbed.errors import NetbedError

RAW = "payload.json"
FILES = (RAW,)
# netperf copies the remote fill file's name into a 32-byte control-message field.
REMOTE_NAME_LIMIT = 31
FILL_PATH = "/tmp/nbfill"
FILL_BYTES = 32 * 1024 * 1024
# x 16 KiB sends = a 16 MiB period: long against e1000's 512 KiB ring and against the
# socket's receive queue (tcp_rmem max 6 MiB), whose pages are recycled too: with a
# 4 MiB period e1000's coverage fell to 0.76 in a window that received 12 MB (2026-11-29)
SEND_WIDTH = 1024


@dataclass(frozen=True)
class Payload:
    """How the payload is made; `period_bytes` is how often the byte stream repeats."""

    kind: str  # "random-fill" or "netperf-default"
    path: str
    size: int
    send_width: int
    send_size: int
    sha256: str = ""

    @property
    def period_bytes(self) -> int:
        if self.kind == "netperf-default":
            return 8  # "netperf" and its NUL, the cursor running on across buffers
        return min(self.size, self.send_width * self.send_size) if self.size else 0

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "period_bytes": self.period_bytes}


def random_fill(send_size: int, path: str = FILL_PATH, size: int = FILL_BYTES,
                send_width: int = SEND_WIDTH) -> Payload:
    """The non-repeating payload: a fill file no shorter than the ring it fills."""
    if len(path) > REMOTE_NAME_LIMIT:
        raise NetbedError(f"fill file name {path!r} is longer than netperf's "
                          f"{REMOTE_NAME_LIMIT}-character limit for the remote side",
                          hint="use a short path such as /tmp/nbfill")
    if send_size <= 0 or send_width <= 0:
        raise NetbedError("send size and width must be positive")
    if size < send_width * send_size:
        raise NetbedError(f"fill file of {size} bytes is shorter than the send ring "
                          f"({send_width} x {send_size}): the stream would repeat early",
                          hint="raise the fill size or lower the send width")
    return Payload("random-fill", path, size, send_width, send_size)


def netperf_default(send_size: int) -> Payload:
    return Payload("netperf-default", "", 0, 0, send_size)


def make_fill_command(payload: Payload) -> str:
    """Create the fill file once per boot (random bytes from the guest kernel's CSPRNG)
    and print its provenance as one JSON line; the digest is kept beside the file."""
    if payload.kind != "random-fill":
        return "echo '{}'"
    p = shlex.quote(payload.path)
    s = shlex.quote(payload.path + ".sha256")
    return (f"if [ ! -s {s} ] || [ $(stat -c %s {p} 2>/dev/null || echo 0) -ne {payload.size} ]; "
            f"then head -c {payload.size} /dev/urandom > {p} && sha256sum {p} > {s}; fi && "
            f"read -r sum _ < {s} && echo \"{{\\\"sha256\\\": \\\"$sum\\\"}}\"")


def parse_fill_provenance(payload: Payload, text: str) -> Payload:
    """The fill command's JSON line -> the payload with its sha256 recorded."""
    try:
        data = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise NetbedError(f"fill file provenance is not JSON: {text.strip()[:200]!r}") from exc
    sha = str(data.get("sha256", ""))
    if payload.kind == "random-fill" and len(sha) != 64:
        raise NetbedError(f"fill file {payload.path}: no sha256 in {text.strip()[:200]!r}",
                          hint="is sha256sum (coreutils) in the guest image?")
    return Payload(payload.kind, payload.path, payload.size, payload.send_width,
                   payload.send_size, sha)


def netperf_global_args(payload: Payload, workload: str) -> list[str]:
    """`-F local[,remote]`: the fill file on the side(s) that send payload.

    STREAM: netperf (the sender guest) sends. MAERTS: netserver (the receiver)
    sends. RR: both send (requests and responses)."""
    if payload.kind != "random-fill":
        return []
    name = workload.upper()
    if name == "TCP_STREAM":
        return ["-F", payload.path]
    if name == "TCP_MAERTS":
        return ["-F", f",{payload.path}"]
    return ["-F", f"{payload.path},{payload.path}"]


def netperf_test_args(payload: Payload) -> list[str]:
    """`-W send,recv`: the send ring's width (receive width left at netperf's default)."""
    return ["-W", f"{payload.send_width},"] if payload.kind == "random-fill" else []


def sending_sides(workload: str) -> tuple[str, ...]:
    """Which guests need the fill file: "sender" (netperf) and/or "receiver" (netserver)."""
    name = workload.upper()
    return {"TCP_STREAM": ("sender",), "TCP_MAERTS": ("receiver",)}.get(
        name, ("sender", "receiver"))
