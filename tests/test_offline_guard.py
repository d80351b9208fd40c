"""tests/conftest.py keeps the test process offline: a public name does not resolve and a
connection to a public address is refused at once, while loopback, which the tests' own servers
use, works."""

import socket

import pytest


def test_a_public_host_neither_resolves_nor_connects():
    with pytest.raises(socket.gaierror, match="tests run offline"):
        socket.getaddrinfo("huggingface.co", 443)
    with socket.socket() as s, pytest.raises(OSError, match="tests run offline"):
        s.connect(("8.8.8.8", 53))
    with socket.socket() as s, pytest.raises(OSError, match="tests run offline"):
        s.connect_ex(("1.1.1.1", 80))


def test_loopback_still_connects():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            conn, _ = server.accept()
            conn.close()
