"""The HTTP server's protocol: a request's headers are its header section, never its trailers.

uvicorn's httptools protocol appends the trailer fields of a chunked body to the request's
header list (``scope["headers"]``) as the body is parsed: a trailer ``Authorization`` would then
authenticate a request whose header section has none, a trailer ``Content-Type`` change how
its body is read, and a trailer that comes late slip past the duplicate-header check that
ran when the headers arrived. RFC 9110 §6.5.1 lets a recipient discard trailer fields, and
nothing here needs them, so they are dropped where they are parsed, for every path at once.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderSectionProtocol(HttpToolsProtocol):
    """httptools' HTTP/1.1 protocol, with the trailer fields of a request discarded."""

    _in_trailers = False

    def on_message_begin(self) -> None:
        """A new request: its fields are headers until the header section ends."""
        self._in_trailers = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep a header-section field; drop a trailer field."""
        if not self._in_trailers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The header section ended: any field parsed from now on is a trailer."""
        self._in_trailers = True
        super().on_headers_complete()
