"""Transport: TLS 1.2+ with certificate and host name checks, and clean failures on mismatch.

Real certificates made for the test (trustme), a real ``chat serve --tls-cert --tls-key``
subprocess, the library client and the ``chat client`` command.
"""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from chatserver import tls
from chatserver.client import ChatClient, ConnectionLost
from chatserver.protocol import Error, Hello, Push
from tests.conftest import ServerProcess, chat_command
from tests.e2e.helpers import wait_until

from .conftest import PASSWORD, WAIT, RawConnection, tls_args

pytestmark = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


@pytest.fixture(scope="module")
def tls_server(certs, tmp_path_factory):
    """One TLS server for the module (registrations unthrottled: the tests register freely)."""
    server = ServerProcess(tmp_path_factory.mktemp("tls") / "chat.db",
                           [*tls_args(certs), "--registrations-per-hour", "0"]).start()
    yield server
    server.kill()


@pytest.fixture
def tls_connect(tls_server, certs):
    """``tls_connect(name=None, **kwargs)``: a ChatClient over TLS trusting the test CA."""
    opened: list[ChatClient] = []

    def open_client(**kwargs) -> ChatClient:
        kwargs.setdefault("tls_context", tls.client_context(str(certs.ca)))
        client = ChatClient(tls_server.host, tls_server.port, timeout=WAIT, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def run_client(port: int, *options: str, script: str = "", host: str = "127.0.0.1"):
    return subprocess.run(chat_command("client", "--host", host, "--port", str(port), *options),
                          input=script, capture_output=True, text=True, timeout=60, check=False)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The CLI failed with exit status 1 and a single line on stderr, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- a verified TLS session works -----------------------------------------------------------------

def test_verified_tls_session_register_send_and_push_of_a_large_message(tls_connect, tls_server):
    alice = tls_connect()
    bob = tls_connect()
    assert alice.register("tls_alice", PASSWORD).name == "tls_alice"
    bob.register("tls_bob", PASSWORD)
    body = "é" * (alice.welcome.max_message_bytes // 2)  # the largest body, many TLS records
    sent = alice.send("tls_bob", body)
    assert sent.pushed is True
    push = bob.pushes.get(timeout=WAIT)
    assert isinstance(push, Push)
    assert (push.message.id, push.message.sender, push.message.body) == (
        sent.message_id, "tls_alice", body)
    assert [m.body for m in bob.fetch().messages] == [body]
    assert "Traceback" not in tls_server.log


def test_server_negotiates_tls_1_2_or_later(tls_server, certs):
    for maximum in (None, ssl.TLSVersion.TLSv1_2):
        context = ssl.create_default_context(cafile=str(certs.ca))
        if maximum is not None:
            context.maximum_version = maximum
        raw = socket.create_connection((tls_server.host, tls_server.port), timeout=WAIT)
        with context.wrap_socket(raw, server_hostname="localhost") as secure:
            version = secure.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        if maximum is not None:
            assert version == "TLSv1.2"


def test_host_name_is_verified_with_the_ip_address_too(tls_server, certs):
    """The certificate names localhost and 127.0.0.1: both verify."""
    for host in ("localhost", "127.0.0.1"):
        sock = socket.create_connection((tls_server.host, tls_server.port), timeout=WAIT)
        with ChatClient(host, tls_server.port, sock=sock, timeout=WAIT,
                        tls_context=tls.client_context(str(certs.ca))) as client:
            assert client.welcome.version == 1


# -- impersonation: untrusted CA, wrong host name --------------------------------------------------

@pytest.mark.parametrize("trust", ["system-store", "other-ca"])
def test_certificate_from_an_untrusted_ca_is_refused(tls_server, certs, trust):
    cafile = None if trust == "system-store" else str(certs.other_ca)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        ChatClient(tls_server.host, tls_server.port, timeout=WAIT,
                   tls_context=tls.client_context(cafile))
    assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"


def test_certificate_for_another_host_name_is_refused(tls_server, certs):
    """A valid certificate of the trusted CA, but for other names than the one dialled."""
    sock = socket.create_connection((tls_server.host, tls_server.port), timeout=WAIT)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        ChatClient("chat.example.org", tls_server.port, sock=sock, timeout=WAIT,
                   tls_context=tls.client_context(str(certs.ca)))
    assert info.value.reason == "CERTIFICATE_VERIFY_FAILED"
    assert "mismatch" in info.value.verify_message.lower()


def test_client_context_verifies_by_default():
    context = tls.client_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- the chat client command -----------------------------------------------------------------------

def test_cli_tls_with_cafile_works(tls_server, certs):
    result = run_client(tls_server.port, "--tls", "--cafile", str(certs.ca), host="localhost",
                        script="/register cli_tls cli-tls-password\n/msg cli_tls over tls\n"
                               "/inbox\n")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower()
    assert "registered and logged in as cli_tls" in result.stdout
    assert "cli_tls: over tls" in result.stdout


def test_cli_tls_without_the_ca_refuses_the_server(tls_server):
    result = run_client(tls_server.port, "--tls", script="/register x_untrusted password-1\n")
    line = one_line_error(result)
    assert "CERTIFICATE_VERIFY_FAILED" in line
    assert "--cafile" in line  # it says what to do


def test_cli_insecure_works_only_with_a_warning(tls_server):
    result = run_client(tls_server.port, "--tls", "--insecure",
                        script="/register cli_insecure insecure-password\n")
    assert result.returncode == 0, result.stderr
    assert "registered and logged in as cli_insecure" in result.stdout
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warning and "--insecure" in warning[0] and "not checked" in warning[0]


# -- the wrong kind of client: a clean error, never a hang -----------------------------------------

def test_plaintext_client_on_the_tls_port_gets_tls_required(tls_server):
    # Bounded by the client's timeout: a hang would be a TimeoutError, not ConnectionLost.
    with pytest.raises(ConnectionLost) as info:
        ChatClient(tls_server.host, tls_server.port, timeout=WAIT)
    assert "tls_required" in str(info.value)


def test_plaintext_raw_frames_on_the_tls_port(tls_server):
    """What goes over the wire: a plaintext Error(tls_required) with request id 0, then EOF."""
    raw = RawConnection(tls_server.host, tls_server.port)
    try:
        raw.send(Hello(request_id=1, version=1, client="plain"))
        events = raw.events_until_closed()
    finally:
        raw.close()
    assert len(events) == 1 and isinstance(events[0], Error), events
    assert (events[0].request_id, events[0].code) == (0, "tls_required")


def test_cli_plaintext_client_on_the_tls_port(tls_server):
    line = one_line_error(run_client(tls_server.port, script="/help\n"))
    assert "tls_required" in line


def test_tls_client_on_a_plaintext_port(server):
    with pytest.raises(ssl.SSLError):
        ChatClient(server.host, server.port, timeout=WAIT, tls_context=tls.client_context())
    line = one_line_error(run_client(server.port, "--tls", script="/help\n"))
    assert line.startswith("Error: TLS with 127.0.0.1:") and "is it a TLS port" in line
    assert server.proc.poll() is None and "Traceback" not in server.log


# -- old protocol versions and stalled handshakes -------------------------------------------------

def _tls11_context(certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(certs.ca))
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.1 only at level 0
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this OpenSSL cannot make a TLS 1.1 client: {exc}")
    return context


def _offer_tls11(tls_server, certs) -> Exception:
    with pytest.raises((ssl.SSLError, ConnectionError)) as info:
        ChatClient(tls_server.host, tls_server.port, timeout=WAIT,
                   tls_context=_tls11_context(certs))
    if "NO_PROTOCOLS_AVAILABLE" in str(info.value) or "no protocols available" in str(info.value):
        pytest.skip("this OpenSSL refuses to offer TLS 1.1 at all")
    return info.value


def test_tls_1_1_client_is_refused_by_the_server(tls_server, certs):
    before = tls_server.log.lower().count("unsupported protocol")
    _offer_tls11(tls_server, certs)
    # the server refused it (not our client giving up before asking)
    wait_until(lambda: tls_server.log.lower().count("unsupported protocol") > before,
               timeout=WAIT, what="the server's refusal in its log")


def test_refused_tls_1_1_client_is_told_why(tls_server, certs):
    """RFC 8446 4.2.1 / RFC 5246 E.1: a server refusing the version sends a protocol_version
    alert, so the client reports "protocol version" instead of an unexplained disconnect."""
    error = _offer_tls11(tls_server, certs)
    assert isinstance(error, ssl.SSLError), f"no TLS alert, the client saw: {error!r}"
    assert "PROTOCOL_VERSION" in str(error).upper().replace(" ", "_")


def test_stalled_handshake_blocks_nobody_and_is_dropped(tls_server, tls_connect):
    """A peer that starts a TLS handshake and never finishes it holds only its own thread,
    and only for tls.HANDSHAKE_TIMEOUT seconds."""
    stalled = socket.create_connection((tls_server.host, tls_server.port), timeout=WAIT)
    silent = socket.create_connection((tls_server.host, tls_server.port), timeout=WAIT)
    try:
        stalled.sendall(b"\x16\x03\x01\x02")  # the first bytes of a ClientHello, then nothing
        client = tls_connect()
        client.register("while_stalled", PASSWORD)
        assert client.send("while_stalled", "still served").message_id > 0
        # the server gives up on both: end of stream, not a hang (the guard is generous)
        for sock in (stalled, silent):
            sock.settimeout(tls.HANDSHAKE_TIMEOUT * 3)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        stalled.close()
        silent.close()
