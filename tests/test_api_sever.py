"""`peerd.api.server.sever`: at shutdown, the API's client connections are shut down at
the socket, and nothing else of the process is touched."""

from __future__ import annotations

import socket

import pytest

from peerd.api.server import sever


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_sever_shuts_the_api_clients_connections_and_nothing_else(host: str) -> None:
    with socket.create_server((host, 0)) as api, socket.create_server(("127.0.0.1", 0)) as other:
        port = api.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = api.accept()
        bystander = socket.create_connection(other.getsockname()[:2])
        kept, _ = other.accept()
        with client, served, bystander, kept:
            assert sever([(host, port)]) == 1
            client.settimeout(5)
            assert client.recv(1) == b""  # the client sees the end of the stream
            with pytest.raises(OSError):
                served.send(b"x")  # and our side's writes fail at once
            bystander.sendall(b"still here")
            assert kept.recv(16) == b"still here"
            assert api.fileno() >= 0 and served.fileno() >= 0  # our descriptors stay ours
