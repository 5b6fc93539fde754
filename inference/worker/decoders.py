"""Untrusted image bytes decoded in processes the worker can kill.

A decoder that overruns its image's deadline inside one native call (libtiff's tile decode,
libjpeg's scan, zlib) cannot be stopped from Python in the same process: a thread can only be
abandoned, with its CPU and memory still held. Here each decode thread of a worker drives a
decoder process of its own: the image's bytes go to it, its uint8 crop comes back. Past the
deadline (``images.decode_timeout_s``, one for the header, the marker walk and the decode,
and ``KILL_GRACE_S`` for the decoder's own answer) the process is killed: nothing of that image
runs or holds memory any more, and the image is a ``decode`` failure. A process that dies (past
its memory bound, a crash in a native decoder) is that image's failure too. A new process
replaces the lost one for the next image.

The decoder processes are forked by a small server of their own (``python -m
inference.worker.decoders``), started once per worker with an allowlisted environment (no
credentials: ``inference.worker.children``) and the decoders imported, so a replacement costs
milliseconds and shares the server's memory until it writes. The server is single-threaded: a
fork of it is safe, where a fork of the threaded Dask worker is not. Each decoder process has at
most ``images.decode_memory_mb`` of data beyond what it started with (``RLIMIT_DATA``) and one
torch thread. What crosses a pipe is plain: a JSON header and raw bytes each way, never a pickle
(a decoder that hostile bytes subverted must not run code in the worker through its answer).

Protocol. Worker to server (a Unix socket): one byte ``n``; the server answers the new
process's pid (8 bytes, big-endian) and passes one end of a socket pair (``SCM_RIGHTS``).
Worker to a decoder: a JSON request ``{"uri", "timeout_s"}``, then the bytes; the decoder
answers a JSON header (``{"ok": true, "shape": [3, h, w]}`` or ``{"ok": false, "stage",
"reason"}``), then, when ok, the crop's raw uint8 bytes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import Connection
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

from inference.records.results import Failure
from inference.settings import ImageSettings
from inference.worker.children import child_env
from inference.worker.images import Preprocessing

log = logging.getLogger(__name__)

KILL_GRACE_S = 0.1  # past the image's deadline: the decoder's own deadline answers first, if it can
START_TIMEOUT_S = 120.0  # the server imports torch and the decoders: seconds, more on a busy host
MAX_ANSWER_BYTES = 64 << 20  # a crop is [3, crop, crop] uint8: far less
# what decoders say when an allocation fails (libwebp, libtiff, libpng through Pillow, torch)
ALLOCATION_FAILED = ("could not create decoder object", "cannot allocate", "out of memory", "Out of memory", "DefaultCPUAllocator")


class DecoderProcesses:
    """Decoder processes for one worker's decode threads; ``decode`` never raises for an image.

    Each call takes an idle process (or forks one) and gives it back after its image; a process
    killed at a deadline or lost is not given back. ``close`` kills them all and the server."""

    def __init__(self, settings: ImageSettings, preprocessing: Preprocessing) -> None:
        self.settings = settings
        self.preprocessing = preprocessing
        self.server = _Server(settings, preprocessing)
        self.idle: list[_Decoder] = []
        self.busy: set[_Decoder] = set()
        self.lock = threading.Lock()
        self.replaced = 0  # processes killed at a deadline or lost
        self.closed = False

    def decode(self, uri: str, data: bytes) -> Any:
        """The uint8 crop [3, crop, crop] of ``data`` (a torch tensor), or the image's Failure."""
        try:
            decoder = self._take()
        except OSError as exc:
            raise DecoderUnavailable(f"cannot start a decoder process: {exc}") from exc
        try:
            outcome = decoder.decode(uri, data, self.settings.decode_timeout_s)
        except _Lost as lost:
            decoder.kill()
            with self.lock:
                self.busy.discard(decoder)
                self.replaced += 1
            return Failure("decode", lost.reason)
        self._give_back(decoder)
        return outcome

    def prestart(self) -> None:
        """Start the server and one decoder process (seconds: it imports torch), ahead of the first image."""
        try:
            decoder = self._take()
        except OSError as exc:
            log.warning("could not start a decoder process ahead of the first image: %s", exc)
            return
        self._give_back(decoder)

    def _give_back(self, decoder: _Decoder) -> None:
        """A decoder done with its image: idle again, or killed once the pool is closed."""
        with self.lock:
            self.busy.discard(decoder)
            if self.closed:
                decoder.kill()
            else:
                self.idle.append(decoder)

    def _take(self) -> _Decoder:
        with self.lock:
            if self.closed:
                raise OSError("the decoders are closed")
            decoder = self.idle.pop() if self.idle else None
        if decoder is None:
            decoder = self.server.fork()
        with self.lock:
            self.busy.add(decoder)
        return decoder

    def pids(self) -> list[int]:
        """The decoder processes alive now (idle and busy)."""
        with self.lock:
            return [decoder.pid for decoder in (*self.idle, *self.busy)]

    def close(self) -> None:
        with self.lock:
            self.closed = True
            decoders, self.idle = [*self.idle, *self.busy], []
        for decoder in decoders:
            decoder.kill()
        self.server.close()


class DecoderUnavailable(RuntimeError):
    """No decoder process could be started (the worker's batch fails and is retried; not the image's fault)."""


class _Lost(Exception):  # noqa: N818 - a signal between two methods of this module
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Server:
    """The worker's side of the decoder server: started on first use, forks decoders on request."""

    def __init__(self, settings: ImageSettings, preprocessing: Preprocessing) -> None:
        self.config = json.dumps({
            "preprocessing": {**asdict(preprocessing), "interpolation": preprocessing.interpolation.value},
            "max_pixels": settings.max_pixels,
            "draft": settings.draft,
            "max_scans": settings.max_jpeg_scans,
            "memory_mb": settings.decode_memory_mb,
        })
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        self.lock = threading.Lock()

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "inference.worker.decoders", str(theirs.fileno()), self.config],
                env=child_env(), pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT_S)
        self.control = ours
        return ours

    def fork(self) -> _Decoder:
        with self.lock:
            control = self.control or self._start()
            try:
                control.sendall(b"n")
                pid = int.from_bytes(_recv_exactly(control, 8), "big")
                [fd] = recvfds(control, 1)
            except (OSError, EOFError, ValueError) as exc:
                self._stop()
                raise OSError(f"the decoder server did not answer ({type(exc).__name__}: {exc})") from exc
        return _Decoder(pid, Connection(fd))

    def _stop(self) -> None:
        control, process = self.control, self.process
        self.control, self.process = None, None
        if control is not None:
            control.close()  # the server exits at the end of its input
        if process is not None:
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5.0)

    def close(self) -> None:
        with self.lock:
            self._stop()


class _Decoder:
    """One decoder process (a child of the server, not of the worker) and the pipe to it."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid = pid
        self.conn = conn

    def decode(self, uri: str, data: bytes, timeout_s: float) -> Any:
        import torch

        conn = self.conn
        try:
            conn.send_bytes(json.dumps({"uri": uri, "timeout_s": timeout_s}).encode())
            conn.send_bytes(data)
            if not conn.poll(timeout_s + KILL_GRACE_S):
                raise _Lost(f"not decoded within images.decode_timeout_s ({timeout_s:g} s): its decoder was stopped")
            header = json.loads(conn.recv_bytes(1 << 16))
            payload = conn.recv_bytes(MAX_ANSWER_BYTES) if header.get("ok") else b""
        except (EOFError, OSError, ValueError) as exc:
            # the decoder's end, not an error of ours: its reason is in the message
            raise _Lost(f"its decoder process died ({type(exc).__name__}): a crash in a native decoder, or past images.decode_memory_mb") from None
        if not header.get("ok"):
            return Failure(str(header.get("stage") or "decode"), str(header.get("reason") or "unknown decoder error"))
        shape = [int(size) for size in header["shape"]]
        if len(shape) != 3 or shape[0] * shape[1] * shape[2] != len(payload):
            raise _Lost(f"its decoder answered {len(payload)} bytes for a crop of {shape}")
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).reshape(shape)

    def kill(self) -> None:
        self.conn.close()
        try:
            os.kill(self.pid, signal.SIGKILL)  # the server reaps it (SIGCHLD ignored)
        except ProcessLookupError:
            pass


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the decoder server closed its socket")
        data += chunk
    return data


# ---- the server and its decoder processes (run in the child) ----

def run_server(control_fd: int, config_json: str) -> None:
    """Fork a decoder for every ``n`` on the control socket, until it closes."""
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # decoders are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops it, by closing the socket
    import torch

    torch.set_num_threads(1)
    import inference.worker.images  # noqa: F401 - imported once, before any fork

    while True:
        try:
            request = control.recv(1)
        except OSError:
            return
        if request != b"n":
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the decoder
            try:
                control.close()
                ours.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                serve(Connection(theirs.detach()), config_json)
            finally:
                os._exit(0)
        theirs.close()
        control.sendall(pid.to_bytes(8, "big"))
        sendfds(control, [ours.fileno()])
        ours.close()


def serve(conn: Connection, config_json: str) -> None:
    """A decoder process: bytes in, crops out, until the pipe closes."""
    import resource

    from inference.errors import ImageError
    from inference.worker.images import decode_crop

    config = json.loads(config_json)
    if config["memory_mb"]:
        limit = _data_bytes() + int(config["memory_mb"]) * (1 << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    from torchvision.transforms import InterpolationMode

    given = config["preprocessing"]
    spec = Preprocessing(
        resize_size=int(given["resize_size"]), crop_size=int(given["crop_size"]), mean=tuple(given["mean"]), std=tuple(given["std"]),
        interpolation=InterpolationMode(given["interpolation"]),
    )
    while True:
        try:
            request = json.loads(conn.recv_bytes(1 << 16))
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        payload = b""
        try:
            crop = decode_crop(data, request["uri"], spec, config["max_pixels"], config["draft"], config["max_scans"], request["timeout_s"])
            answer: dict[str, Any] = {"ok": True, "shape": list(crop.shape)}
            payload = crop.contiguous().numpy().tobytes()
        except ImageError as exc:
            reason = exc.reason
            if config["memory_mb"] and any(sign in reason for sign in ALLOCATION_FAILED):
                reason += f" (past this decoder's memory bound? images.decode_memory_mb: {config['memory_mb']})"
            answer = {"ok": False, "stage": exc.stage, "reason": reason}
        except MemoryError:
            answer = {"ok": False, "stage": "decode", "reason": f"out of memory decoding it (images.decode_memory_mb: {config['memory_mb']})"}
        except Exception as exc:  # noqa: BLE001 - whatever a decoder raises is this image's alone
            answer = {"ok": False, "stage": "decode", "reason": f"{type(exc).__name__}: {exc}"[:500]}
        del data
        try:
            conn.send_bytes(json.dumps(answer).encode())
            if answer["ok"]:
                conn.send_bytes(payload)
        except OSError:
            return


def _data_bytes() -> int:
    """This process's data segment now (VmData): what RLIMIT_DATA counts."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    run_server(int(sys.argv[1]), sys.argv[2])
