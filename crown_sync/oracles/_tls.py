"""A client's TLS context from the ``tls``, ``tls_ca``, ``tls_cert`` and ``tls_key`` options."""

import ssl
from typing import Optional

__all__ = ["client_context"]


def client_context(tls: bool, ca: Optional[str], cert: Optional[str], key: Optional[str],
                   how: str = "tls=true") -> Optional[ssl.SSLContext]:
    """The client's TLS context (the server's certificate always verified, against ``ca`` or the
    system's store; ``cert``/``key``: a client certificate), or None without TLS. A ValueError
    names the option whose file cannot be used, or that makes no sense without TLS (``how``: how
    to ask for TLS, for that message)."""
    if not tls:
        given = [name for name, value in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)) if value]
        if given:
            raise ValueError(f"{', '.join(given)} given without TLS: use {how}")
        return None
    if key and not cert:
        raise ValueError("tls_key given without tls_cert")
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls_ca {ca!r} cannot be used: {exc}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls_cert {cert!r} / tls_key {key!r} cannot be used: {exc}") from None
    return context
