"""A loopback-only local worker: a seccomp filter turns the worker's bind() into notifications that bind it to
loopback (TFF 0.87's worker binds every interface and has no flag for it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import struct
import subprocess
import sys
import threading
from typing import IO


# The worker has no flag for its listen address: TFF 0.87 binds "[::]:PORT", every interface
# (tensorflow_federated/cc/simulation/servers.cc). A loopback-only worker is started by a
# helper (a fresh `python -I -S`, single-threaded) that installs a seccomp filter turning the
# worker's bind() calls into notifications to us, sends us the notification fd, and execs the
# worker (same pid, our child). `_LoopbackBinder` binds the socket of a wildcard bind() to
# loopback instead (a copy of the worker's socket, by pidfd_getfd), and lets other binds run.
# Only bind() is filtered: a few BPF instructions per worker system call, nothing per round.
# Linux >= 5.6 on x86_64/aarch64; anything missing -> the worker runs as before (all interfaces).
_SECCOMP_ARCH = {  # machine -> (AUDIT_ARCH_*, __NR_bind, __NR_seccomp)
    "x86_64": (0xC000003E, 49, 317),
    "aarch64": (0xC00000B7, 200, 277),
}
_SECCOMP_HELPER = r"""
import ctypes, os, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
audit_arch, nr_bind, nr_seccomp = (int(a) for a in sys.argv[2:5])
worker = sys.argv[5:]
def go(message, fds=()):  # "+" with the fd, or "-" and why not (an fd needs a byte of data)
    socket.send_fds(sock, [message.encode()], list(fds))
    sock.close()
    os.execv(worker[0], worker)
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: lets an unprivileged process filter itself
        go("-prctl(PR_SET_NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno()))
    code = [  # classic BPF over struct seccomp_data {int nr; u32 arch; ...}
        (0x20, 0, 0, 4), (0x15, 0, 3, audit_arch),  # ld arch; jne -> allow
        (0x20, 0, 0, 0), (0x15, 0, 1, nr_bind),  # ld nr; jne -> allow
        (0x06, 0, 0, 0x7FC00000),  # SECCOMP_RET_USER_NOTIF
        (0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in code))
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(code), ctypes.addressof(insns)))
    # SECCOMP_SET_MODE_FILTER, flags NEW_LISTENER | SPEC_ALLOW (no speculation mitigation cost)
    listener = libc.syscall(ctypes.c_long(nr_seccomp), ctypes.c_long(1), ctypes.c_long(8 | 4), prog)
    if listener < 0:
        go("-seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): " + os.strerror(ctypes.get_errno()))
    go("+", [listener])
except Exception as e:
    go(f"-{type(e).__name__}: {e}")
"""
_NOTIF_RECV, _NOTIF_SEND, _NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102  # SECCOMP_IOCTL_NOTIF_*
_NR_PIDFD_GETFD = 438  # the same on every architecture
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _LoopbackBinder:
    """Answers the seccomp notifications of a worker's bind() calls (a daemon thread).

    A bind() to the wildcard address (`[::]` or `0.0.0.0`) is done on loopback
    instead (`::ffff:127.0.0.1` on a dual-stack IPv6 socket, `::1` on an
    IPv6-only one, `127.0.0.1` on IPv4) and the worker is told it succeeded
    (or gets the error of that bind); other binds run unchanged. If a
    wildcard bind cannot be redirected (e.g. pidfd_getfd not permitted), it
    runs unchanged too, and `failure` says why.
    """

    def __init__(self, proc: subprocess.Popen, listener: int, log: IO | None):
        self.proc = proc
        self.listener = listener
        self.log = log
        self.bound: list[str] = []  # loopback addresses the worker listens on, "127.0.0.1:PORT"
        self.failure: str | None = None
        threading.Thread(target=self._run, name=f"loopback-binder-{proc.pid}", daemon=True).start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if not any(ev & select.POLLIN for _, ev in events):
                    return  # POLLHUP: the worker is gone
                notif = bytearray(80)  # struct seccomp_notif
                try:
                    fcntl.ioctl(self.listener, _NOTIF_RECV, notif, True)
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue  # the caller was interrupted; poll again (HUP if gone)
                    raise
                nid, tid = struct.unpack_from("QI", notif)
                fd, addr, addrlen = struct.unpack_from("3Q", notif, 32)  # seccomp_data.args[0:3]
                try:
                    error = self._bind(nid, tid, fd, addr, addrlen)
                except Exception as e:  # noqa: BLE001  (any failure: the worker binds as before)
                    self.failure = f"{type(e).__name__}: {e}"
                    error = None
                # struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}; flag 1: CONTINUE the call
                resp = (nid, 0, 0, 1) if error is None else (nid, 0, error, 0)
                try:
                    fcntl.ioctl(self.listener, _NOTIF_SEND, bytearray(struct.pack("QqiI", *resp)), True)
                except OSError:
                    pass  # the caller is gone
        except Exception as e:  # noqa: BLE001  (binds fail from now on: local_context starts a plain worker)
            self.failure = f"{type(e).__name__}: {e}"
        finally:
            os.close(self.listener)

    def _bind(self, nid: int, tid: int, fd: int, addr: int, addrlen: int) -> int | None:
        """Binds the worker's socket `fd` to loopback if `addr` is a wildcard: 0 or -errno; None: run the call."""
        mem = os.open(f"/proc/{tid}/mem", os.O_RDONLY)  # after exec: the worker's memory
        try:
            sa = os.pread(mem, min(addrlen, 128), addr)
        finally:
            os.close(mem)
        family, port = struct.unpack_from("=H", sa)[0], struct.unpack_from("!H", sa, 2)[0]
        wildcard = (family == socket.AF_INET6 and sa[8:24] == bytes(16)) or (
            family == socket.AF_INET and sa[4:8] == bytes(4)
        )
        if not wildcard:
            return None
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            copy = _libc.syscall(*map(ctypes.c_long, (_NR_PIDFD_GETFD, pidfd, fd, 0)))
            if copy < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(pidfd)
        with socket.socket(fileno=copy) as sock:
            fcntl.ioctl(self.listener, _NOTIF_ID_VALID, struct.pack("Q", nid))  # still the same call
            if family == socket.AF_INET:
                host, shown = "127.0.0.1", "127.0.0.1"
            elif sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                host, shown = "::1", "[::1]"
            else:
                host, shown = "::ffff:127.0.0.1", "127.0.0.1"
            try:
                sock.bind((host, port))
            except OSError as e:
                return -e.errno
        self.bound.append(f"{shown}:{port}")
        if self.log is not None:
            os.write(
                self.log.fileno(),
                f"dpfl_tff: this worker listens on {shown}:{port} only (loopback): its bind to the wildcard "
                f"address was redirected; its own 'listening on' line names the address it asked for\n".encode(),
            )
        return 0


def _start_loopback_only(
    argv: list[str], log: IO | None, **popen_kw
) -> tuple[subprocess.Popen, _LoopbackBinder | str]:
    """Starts `argv` via the seccomp helper; returns the process and its binder, or why there is none."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None or not hasattr(os, "pidfd_open") or not sys.executable:
        why = f"not supported here ({platform.machine()}, Python {platform.python_version()})"
        return subprocess.Popen(argv, **popen_kw), why
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _SECCOMP_HELPER, str(theirs.fileno()), *map(str, arch), *argv],
            pass_fds=(theirs.fileno(),),
            **popen_kw,
        )
        theirs.close()
        ours.settimeout(60.0)
        try:
            message, fds, _, _ = socket.recv_fds(ours, 1024, 1)
        except OSError as e:
            message, fds = f"-helper: {e}".encode(), []
    if message != b"+" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return proc, message.decode(errors="replace")[1:] or "the helper exited"
    return proc, _LoopbackBinder(proc, fds[0], log)


