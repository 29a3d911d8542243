"""TlsSession: the server's TLS on memory buffers, against a client ``SSLContext.wrap_bio``.

No sockets: records are carried between the two ends by hand, which is all the I/O loop
does with them. Certificates come from trustme (a throwaway CA and a localhost certificate).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from chatserver.tls import TlsSession, client_context, server_context

ALERT_RECORD = 21  # TLS record content type of an alert


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    where = tmp_path_factory.mktemp("tls-session-certs")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    files = Certs(ca=where / "ca.pem", cert=where / "server.pem", key=where / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    return files


class Client:
    """A TLS client on memory BIOs: the peer of a TlsSession."""

    def __init__(self, context: ssl.SSLContext, hostname: str = "localhost"):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)

    def handshake_step(self) -> bool:
        try:
            self.ssl.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    def take(self) -> bytes:
        return self.outgoing.read()

    def feed(self, records: bytes) -> None:
        self.incoming.write(records)

    def encrypt(self, data: bytes) -> bytes:
        self.ssl.write(data)
        return self.take()

    def decrypt(self, records: bytes) -> bytes:
        self.feed(records)
        chunks = []
        while True:
            try:
                chunk = self.ssl.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def handshake(server: TlsSession, client: Client) -> None:
    """Carry records between the two ends until both have finished the handshake."""
    client.handshake_step()  # the ClientHello
    for _ in range(5):  # a handshake takes two or three flights
        server_done, to_client = server.handshake(client.take())
        client.feed(to_client)
        client_done = client.handshake_step()
        if server_done and client_done:
            return
    pytest.fail("the handshake did not complete")


@pytest.fixture
def connected(certs) -> Iterator[tuple[TlsSession, Client]]:
    server = TlsSession(server_context(str(certs.cert), str(certs.key)))
    client = Client(client_context(cafile=str(certs.ca)))
    handshake(server, client)
    yield server, client


def test_handshake_completes_against_a_verifying_client(certs):
    """A client that checks the certificate and host name completes the handshake; the
    first call, with nothing received yet from a server's point of view, is not done."""
    server = TlsSession(server_context(str(certs.cert), str(certs.key)))
    client = Client(client_context(cafile=str(certs.ca)))
    assert server.handshake(b"") == (False, b"")  # no ClientHello yet: nothing to say
    assert client.handshake_step() is False
    hello = client.take()
    done, flight = server.handshake(hello)
    assert done is False
    assert flight  # ServerHello and the rest of its flight
    client.feed(flight)
    assert client.handshake_step() is True
    done, _after = server.handshake(client.take())
    assert done is True
    assert client.ssl.version() in ("TLSv1.2", "TLSv1.3")
    assert client.ssl.getpeercert()["subjectAltName"][0] == ("DNS", "localhost")


def test_client_to_server_round_trip(connected):
    """What the client encrypts, the server's decrypt returns as plaintext, whole."""
    server, client = connected
    data, closed = server.decrypt(client.encrypt(b"hello server"))
    assert data == b"hello server"
    assert closed is False
    client.feed(server.take_outgoing())  # what the read produced, if anything

    big = bytes(range(256)) * 1000  # several records
    data, closed = server.decrypt(client.encrypt(big))
    assert data == big
    assert closed is False


def test_server_to_client_round_trip(connected):
    """What the server encrypts, the client decrypts; each call's records stand alone."""
    server, client = connected
    first = server.encrypt(b"hello client")
    second = server.encrypt(b" and more")
    assert b"hello client" not in first  # really encrypted
    assert client.decrypt(first + second) == b"hello client and more"


def test_records_split_anywhere_are_reassembled(connected):
    """Records fed to decrypt in arbitrary pieces yield the plaintext once complete."""
    server, client = connected
    records = client.encrypt(b"split across reads")
    plaintext = b""
    for i in range(0, len(records), 7):
        data, closed = server.decrypt(records[i:i + 7])
        plaintext += data
        assert closed is False
    assert plaintext == b"split across reads"


def test_decrypt_of_nothing_returns_nothing(connected):
    """decrypt(b"") after the handshake yields no plaintext and no close."""
    server, _client = connected
    data, closed = server.decrypt(b"")
    assert (data, closed) == (b"", False)


def test_failed_handshake_raises_and_leaves_an_alert(certs):
    """A client that wants only TLS 1.3 against a TLS 1.2 server: handshake() raises
    ssl.SSLError and take_outgoing() holds the alert, which the client then reports."""
    context = server_context(str(certs.cert), str(certs.key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    server = TlsSession(context)
    client_ctx = client_context(cafile=str(certs.ca))
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client = Client(client_ctx)
    assert client.handshake_step() is False
    with pytest.raises(ssl.SSLError):
        server.handshake(client.take())
    alert = server.take_outgoing()
    assert alert and alert[0] == ALERT_RECORD
    assert server.take_outgoing() == b""  # taken once
    client.feed(alert)
    with pytest.raises(ssl.SSLError, match="(?i)alert"):
        client.handshake_step()


def test_garbage_instead_of_a_client_hello_raises(certs):
    """Bytes that are not TLS make handshake() raise ssl.SSLError."""
    server = TlsSession(server_context(str(certs.cert), str(certs.key)))
    with pytest.raises(ssl.SSLError):
        server.handshake(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_close_notify_from_the_peer_reports_tls_closed(connected):
    """The peer's close_notify, after its last data: decrypt returns that data and
    tls_closed=True (and plain data before it did not)."""
    server, client = connected
    data, closed = server.decrypt(client.encrypt(b"still open"))
    assert (data, closed) == (b"still open", False)
    records = client.encrypt(b"last words")
    with pytest.raises(ssl.SSLWantReadError):  # it sent close_notify; now awaits ours
        client.ssl.unwrap()
    records += client.take()
    data, closed = server.decrypt(records)
    assert data == b"last words"
    assert closed is True


def test_encrypt_from_several_threads_yields_whole_records(connected):
    """Concurrent encrypt calls (replies are written by several threads) each produce whole
    records: kept in the order they were made, they decrypt to the messages in that order."""
    server, client = connected
    records: list[bytes] = []
    messages: list[bytes] = []
    order = threading.Lock()  # the caller keeps records in order on the wire, as Output does
    barrier = threading.Barrier(4)

    def writer(k: int) -> None:
        barrier.wait(10)
        for i in range(50):
            message = b"<%d.%d>" % (k, i)
            with order:
                records.append(server.encrypt(message))
                messages.append(message)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(messages) == 200
    assert client.decrypt(b"".join(records)) == b"".join(messages)
