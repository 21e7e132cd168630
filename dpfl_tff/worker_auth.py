"""Mutual TLS between a driver and its `--workers`: a worker serves only drivers holding the run's credential.

TFF's `worker_binary` runs whatever computation it is sent and has no TLS or
authentication, only `--port`. `experiments.run_worker` therefore starts it on
loopback only (`runtime.start_worker(loopback_only=True)`) and puts a
`TlsFront` on the public port: it completes a TLS handshake that requires a
client certificate signed by the run's own CA (and marked for client
authentication), and only then forwards the connection's bytes, unchanged, to
the worker's loopback port. gRPC's HTTP/2 (negotiated by ALPN "h2") runs
inside the tunnel; the driver uses an ordinary gRPC TLS channel
(`secure_channel`).

Why mutual TLS and not TLS plus a shared token: the front then needs to
understand nothing of gRPC. A token travels in HTTP/2 headers (HPACK
compressed, per call), so checking it would mean parsing and re-framing every
HTTP/2 stream; a client certificate is checked once per connection, before a
single byte reaches the worker, by OpenSSL.

The credential (`make_credentials`) is a fresh CA whose private key is
discarded once it has signed two certificates: `worker/` (server
authentication, name `TARGET_NAME`) and `driver/` (client authentication).
Each folder holds `ca.pem`, `cert.pem`, `key.pem`. Nobody can issue another
certificate of that CA; the worker certificate cannot drive a worker (its
extended key usage is server authentication only). The worker's name is not
a host name: drivers check that the worker holds the run's certificate, not
which host it is on, so one credential serves every worker host.
"""

from __future__ import annotations

import select
import dataclasses
import datetime
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable

from dpfl_tff.errors import ConfigError

TARGET_NAME = "dpfl-tff-worker"  # the name in every worker certificate; drivers check it
ROLES = ("worker", "driver")
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"
VALID_DAYS = 365
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may take to authenticate before the front drops it
_BUFFER = 1 << 20  # bytes moved per system call each way
_TLS_RECORD = 1 << 14  # the largest TLS record's plaintext
_REPEAT_SECONDS = 60.0  # a host refused again for the same reason within this is counted, not logged


class CredentialError(ConfigError):
    """A credential folder is missing, incomplete, damaged or of the wrong role."""


@dataclasses.dataclass(frozen=True)
class Credential:
    """One side's credential: the run's CA certificate and this side's certificate and key (PEM paths)."""

    directory: str
    role: str
    ca: str
    cert: str
    key: str

    def server_context(self) -> ssl.SSLContext:
        """The worker's TLS context: a client certificate of the run's CA is required; ALPN h2."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # OpenSSL also checks the client certificate's purpose (clientAuth)
        ctx.set_alpn_protocols(["h2"])  # what gRPC's client requires
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The driver's TLS context for `probe`: it checks the worker as gRPC's channel does.

        TLS 1.2 only: there the worker checks our certificate before the
        handshake ends, so a refusal fails the handshake itself (in TLS 1.3 it
        arrives after, and can be lost to the connection's reset).
        """
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.set_alpn_protocols(["h2"])
        return ctx


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def load(directory: str, role: str, flag: str = "--worker_credentials") -> Credential:
    """The `role` ("worker" or "driver") credential in `directory` (made by `make_credentials`).

    `directory` is either a role's folder (`DIR/worker`, `DIR/driver`) or the
    folder `make_credentials` wrote, holding both.

    Raises:
      CredentialError: files missing or unreadable, a certificate that does
        not match its key, or a certificate of the other role.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    folder = directory
    if not os.path.exists(os.path.join(folder, CERT_FILE)) and os.path.isdir(os.path.join(folder, role)):
        folder = os.path.join(folder, role)
    paths = [os.path.join(folder, name) for name in (CA_FILE, CERT_FILE, KEY_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise CredentialError(
            f"{flag}={directory}: no {', '.join(os.path.basename(p) for p in missing)} in {folder} (make a credential "
            "with `uv run python -m experiments.run_worker --make_credentials=DIR`, then give DIR or "
            f"DIR/{role})"
        )
    cred = Credential(directory, role, *paths)
    try:
        ctx = cred.server_context() if role == "worker" else cred.client_context()
        del ctx
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        cert = x509.load_pem_x509_certificate(_read(cred.cert))
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (OSError, ssl.SSLError, ValueError) as e:
        raise CredentialError(f"{flag}={directory}: cannot use the credential in {folder}: {e}") from None
    except Exception as e:  # noqa: BLE001  (cryptography's ExtensionNotFound and the like)
        raise CredentialError(f"{flag}={directory}: not a credential of make_credentials ({type(e).__name__})") from None
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if role == "worker" else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in usage:
        other = "driver" if role == "worker" else "worker"
        raise CredentialError(
            f"{flag}={directory}: {folder} holds a {other} credential; give the {role}'s (DIR/{role})")
    return cred


def make_credentials(directory: str, days: int = VALID_DAYS) -> list[str]:
    """Writes a new credential to `directory` (which must not exist or be empty): `worker/` and `driver/`.

    Each holds `ca.pem` (the run's CA certificate), `cert.pem` and `key.pem`
    (mode 0600). The CA's own key is not written. Certificates are valid for
    `days` days (from an hour ago, for clocks that differ a little). ECDSA
    P-256 keys.

    Returns:
      The folders written (worker, driver).

    Raises:
      FileExistsError: `directory` is not empty.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise FileExistsError(f"--make_credentials={directory}: exists and is not empty; give a new folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    run_id = os.urandom(6).hex()

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dpfl_tff run " + run_id),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("dpfl_tff run CA")
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    os.makedirs(directory, mode=0o700, exist_ok=True)
    written = []
    for role, usage in (("worker", ExtendedKeyUsageOID.SERVER_AUTH), ("driver", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(TARGET_NAME if role == "worker" else "dpfl-tff-driver"))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if role == "worker":
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(TARGET_NAME)]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        folder = os.path.join(directory, role)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        files = {
            CA_FILE: (ca_cert.public_bytes(pem), 0o644),
            CERT_FILE: (cert.public_bytes(pem), 0o644),
            KEY_FILE: (key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600),
        }
        for filename, (data, mode) in files.items():
            fd = os.open(os.path.join(folder, filename), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        written.append(folder)
    return written


def secure_channel(address: str, credential: Credential, options: list[tuple[str, object]]):
    """A gRPC channel to a `TlsFront` at `address` that presents `credential` (a driver's) and checks the worker's."""
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(credential.ca), private_key=_read(credential.key),
        certificate_chain=_read(credential.cert))
    return grpc.secure_channel(address, creds, [*options, ("grpc.ssl_target_name_override", TARGET_NAME)])


class Refused(Exception):
    """The TLS handshake with a worker failed: one side does not hold the run's credential."""


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, credential: Credential, timeout: float) -> bool:
    """Whether the worker at `address` accepts `credential`, by one TLS connection and an HTTP/2 greeting.

    Returns:
      True when the worker authenticated us, we it, and its TFF worker
      answered the greeting; False when nothing answered (not up yet, or
      down): the caller may try again.

    Raises:
      Refused: the handshake failed, with one line saying which side refused.
    """
    host, port = _split(address)
    ctx = credential.client_context()
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    try:
        with ctx.wrap_socket(raw, server_hostname=TARGET_NAME) as tls:
            tls.settimeout(timeout)
            tls.sendall(_HTTP2_PREFACE)
            return bool(tls.recv(9))  # the worker's SETTINGS frame; b"": the front has no worker behind it
    except ssl.SSLCertVerificationError as e:
        raise Refused(
            f"{address}: refused the worker: its certificate is not one of this run's credential "
            f"({e.verify_message}; --worker_credentials={credential.directory} is another run's, or that "
            "worker was started with another one)") from None
    except ssl.SSLError as e:
        if "wrong version number" in str(e) or "record layer failure" in str(e):
            raise Refused(f"{address}: does not speak TLS (started with --insecure_workers? then give "
                          "--insecure_workers here instead of --worker_credentials)") from None
        raise Refused(f"{address}: the worker refused this driver's certificate ({_alert(e)}; "
                      f"--worker_credentials={credential.directory} is not the credential it was started "
                      "with)") from None
    except (OSError, TimeoutError):
        return False


def probe_insecure(address: str, timeout: float) -> bool:
    """Whether a plain (`--insecure_workers`) TFF worker answers at `address` an HTTP/2 greeting.

    Returns:
      True when it answered with an HTTP/2 SETTINGS frame; False when
      nothing answered (the caller may try again).

    Raises:
      Refused: something answered that is not a plain gRPC server, or closed
        the connection at once: a worker started with --worker_credentials.
    """
    host, port = _split(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(_HTTP2_PREFACE)
            head = sock.recv(9)
        except (OSError, TimeoutError):
            head = b""
    if len(head) >= 4 and head[3] == 4:  # an HTTP/2 frame of type SETTINGS
        return True
    raise Refused(f"{address}: does not answer plain gRPC (it closed the connection or answered in TLS): a worker "
                  "started with --worker_credentials needs --worker_credentials=DIR/driver of the same credential "
                  "here, not --insecure_workers")


def _alert(error: ssl.SSLError) -> str:
    """'tlsv1 alert unknown ca' from an SSLError's message."""
    return getattr(error, "reason", None) and str(error.reason).lower().replace("_", " ") or str(error)


def _refusal(error: BaseException) -> str:
    """Why the front refused a connection, in words (the line run_worker prints)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"its certificate is not a driver certificate of this run ({error.verify_message})"
    if isinstance(error, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return "it closed the connection during the TLS handshake (it does not trust this worker's certificate?)"
    if isinstance(error, ssl.SSLError):
        reason = _alert(error)
        if "alert" in reason:
            return f"it rejected this worker's certificate ({reason}: it holds another run's credential)"
        if "certificate" in reason:  # peer did not return a certificate
            return f"it presented no certificate ({reason})"
        if "wrong version" in reason or "http" in reason or "unknown protocol" in reason:
            return f"it does not speak TLS ({reason}: a driver with --insecure_workers, or not a driver)"
        return f"TLS handshake failed ({reason})"
    if isinstance(error, TimeoutError):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    return f"{type(error).__name__}: {error}"


def bound_socket(port: int) -> socket.socket:
    """A TCP socket bound to every interface (IPv6 dual-stack where available), port `port`, not listening yet.

    Until `TlsFront` listens on it, connections are refused (not queued), so a
    driver's `probe` retries instead of waiting on a worker that is starting.

    Raises:
      OSError: the port is in use.
    """
    if socket.has_dualstack_ipv6():
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address = ("::", port)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("0.0.0.0", port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed port (TIME_WAIT) is free
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class TlsFront:
    """Authenticates connections to `sock`'s port by mutual TLS and forwards the accepted ones to `127.0.0.1:inner_port`.

    A daemon thread accepts; each connection gets a thread of its own that
    does the handshake (at most `HANDSHAKE_TIMEOUT` seconds) and then copies
    bytes, unchanged, both ways until either side closes (one thread per
    connection, so its TLS object is never used by two threads at once).
    Every refused connection gives one line through `log` ("refused a
    connection from HOST:PORT: why"; the same host and reason again within a
    minute is counted in the next such line instead), and every accepted one
    a line naming its peer.
    """

    def __init__(self, sock: socket.socket, inner_port: int, credential: Credential, log: Callable[[str], None]):
        self._sock = sock
        self._inner_port = inner_port
        self._ctx = credential.server_context()
        self._log = log
        self.accepted = 0
        self.refused = 0
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}  # (host, why) -> (last logged, not logged since)
        self._lock = threading.Lock()
        self._closed = False
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._accept_loop, name="dpfl_tff_tls_front", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # e.g. EMFILE: try again
                continue
            threading.Thread(target=self._handle, args=(conn, peer), name="dpfl_tff_tls_conn", daemon=True).start()

    def _log_refusal(self, host: str, who: str, why: str) -> None:
        """One line per refusal; the same host refused for the same reason again within a minute is counted."""
        with self._lock:
            now = time.monotonic()
            last, hidden = self._refusals.get((host, why), (-1e9, 0))
            if now - last < _REPEAT_SECONDS:
                self._refusals[(host, why)] = (last, hidden + 1)
                return
            self._refusals[(host, why)] = (now, 0)
        more = f" ({hidden} more from {host} since, not shown)" if hidden else ""
        self._log(f"refused a connection from {who}: {why}{more}")

    def close(self) -> None:
        """Stops accepting (open connections end with the process)."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _handle(self, conn: socket.socket, peer) -> None:
        who = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:  # the handshake: only a certificate of the run's CA for client authentication gets past it
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except (OSError, TimeoutError) as e:
            with self._lock:
                self.refused += 1
            self._log_refusal(peer[0], who, _refusal(e))
            conn.close()
            return
        try:
            inner = socket.create_connection(("127.0.0.1", self._inner_port), timeout=10)
        except OSError as e:
            self._log(f"connection from {who}: authenticated, but the TFF worker does not answer ({e})")
            tls.close()
            return
        with self._lock:
            self.accepted += 1
        self._log(f"driver connected from {who}")
        try:
            _forward(tls, inner)
        finally:
            inner.close()
            tls.close()


def _forward(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Copies bytes both ways between `tls` and `inner` until either closes (in the calling thread).

    Each way moves up to `_BUFFER` bytes per system call: the TLS side is
    drained without blocking (every record already received, decrypted into
    one buffer) and then sent in one `sendall`; one record per call (16 KiB)
    costs three times the CPU per megabyte (scripts/bench_round.py's TLS turn).
    """
    for s in (tls, inner):
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poller = select.poll()
    poller.register(tls, select.POLLIN)
    poller.register(inner, select.POLLIN)
    fd_tls = tls.fileno()
    out, back = memoryview(bytearray(_BUFFER)), memoryview(bytearray(_BUFFER))
    try:
        while True:
            ready = [fd for fd, _ in poller.poll()]
            if fd_tls in ready:
                while True:
                    n, closed = _drain(tls, out)
                    if n:
                        inner.sendall(out[:n])
                    if closed:
                        return
                    if not tls.pending():  # a record only partly read: poll() would not say so
                        break
            if len(ready) > 1 or fd_tls not in ready:
                n = inner.recv_into(back)
                if not n:
                    return
                tls.sendall(back[:n])
    except (OSError, ssl.SSLError):
        return


def _drain(tls: ssl.SSLSocket, buffer: memoryview) -> tuple[int, bool]:
    """Reads into `buffer` what `tls` holds without waiting: (bytes read, whether the peer closed)."""
    n = 0
    tls.setblocking(False)
    try:
        while len(buffer) - n > _TLS_RECORD:  # room for one whole record: nothing is left half-read
            try:
                k = tls.recv_into(buffer[n:])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            if not k:
                return n, True
            n += k
    finally:
        tls.setblocking(True)
    return n, False


def wait_for_front(address: str, credential: Credential, timeout: float) -> None:
    """Blocks until `probe` succeeds (raises `Refused`, or TimeoutError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not probe(address, credential, max(0.5, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address}: no TLS worker answered within {timeout:g} s")
        time.sleep(0.1)
