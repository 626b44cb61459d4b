"""DICOM TLS: the server context, and the handshake done off the accept loop.

Wrapping an accepted socket in the accept loop would let a client that connects and
says nothing hold up every other connection until it gave up. So the TLS port's
listener accepts plain sockets and the handshake runs in the connection's own thread
(``AssociationEvents.connected``), bounded by ``tls.handshake_timeout_s``.
"""

from __future__ import annotations

import socket
import ssl

from infergate.config import DestinationTls, TlsSettings
from infergate.errors import ConfigError, TlsRefusedError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context every TLS connection is accepted with.

    Raises :class:`ConfigError` naming the file that cannot be read or used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.minimum_version]
    try:
        context.load_cert_chain(settings.certificate, settings.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"ingest.tls: cannot use certificate {settings.certificate} with private key"
            f" {settings.private_key}: {_reason(exc)}"
        ) from exc
    if settings.client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"ingest.tls: cannot read client_ca {settings.client_ca}: {_reason(exc)}"
            ) from exc
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_context(settings: DestinationTls) -> ssl.SSLContext:
    """The context Infergate connects to a TLS destination with: its certificate is
    verified against ``ca`` and its name; ours is presented when configured.

    Raises :class:`ConfigError` naming the file that cannot be read or used.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[settings.minimum_version]
    try:
        context.load_verify_locations(cafile=settings.ca)
        if settings.certificate is not None and settings.private_key is not None:
            context.load_cert_chain(settings.certificate, settings.private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"export destination tls: {_reason(exc)}") from exc
    return context


def handshake(raw: socket.socket, context: ssl.SSLContext, timeout_s: float) -> ssl.SSLSocket:
    """Run the server side of the handshake on an accepted socket.

    Returns the TLS socket (blocking, no timeout: the caller sets its own). Raises
    :class:`TlsRefusedError` saying why the client was refused; ``peer_closed`` is
    set on it when the client went away before sending anything (a health check).
    The socket is closed then.
    """
    raw.settimeout(timeout_s)
    wrapped = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
    try:
        wrapped.do_handshake()
    except (OSError, ssl.SSLError) as exc:
        wrapped.close()
        closed = isinstance(exc, ssl.SSLEOFError | ConnectionResetError) or (
            isinstance(exc, ssl.SSLError) and "EOF" in str(exc)
        )
        raise TlsRefusedError(_reason(exc), peer_closed=closed) from exc
    wrapped.settimeout(None)
    return wrapped


def client_subject(tls: ssl.SSLSocket) -> str | None:
    """The common name of the verified client certificate, if the client sent one."""
    certificate = tls.getpeercert()
    subject = certificate.get("subject", ()) if certificate else ()
    names = [
        pair[1]
        for rdn in subject
        if isinstance(rdn, tuple)
        for pair in rdn
        if isinstance(pair, tuple) and pair[0] == "commonName"
    ]
    return str(names[0]) if names else None


# OpenSSL's reason codes, and what they mean for the operator.
_REASONS = (
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE",), "the client sent no certificate, and one is required"),
    (("CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN"),
     "the client's certificate is not trusted"),
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"),
     "the client does not speak TLS (plain DICOM on the TLS port?)"),
    (("UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION"), "the client's TLS version is not allowed"),
)  # fmt: skip


def _reason(exc: BaseException) -> str:
    """A TLS failure in words an operator can act on."""
    if isinstance(exc, TimeoutError):
        return "the client did not complete the TLS handshake in time"
    code = str(getattr(exc, "reason", "") or "").upper()
    for markers, meaning in _REASONS:
        if any(marker in code for marker in markers):
            return f"{meaning} ({code.lower()})"
    return f"TLS handshake failed ({code.lower() or exc})"
