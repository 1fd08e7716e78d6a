"""A Redis-protocol server on loopback whose replies a test scripts: the hostile or broken servers that no real
server plays (a reply trickled a byte at a time, ...).

``ScriptedServer(answer, info)`` answers the handshake (HELLO, CLIENT, PING, INFO with ``info``) itself and
every other command with the chunks ``answer(command)`` yields, sent as they come (the generator may sleep
between them).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from typing import BinaryIO

Answer = Callable[[list[bytes]], Iterable[bytes]]
INFO = b"# Server\r\nrun_id:scripted\r\n# Stats\r\nevicted_keys:0\r\n"


def _handshake(command: list[bytes], info: bytes) -> bytes | None:
    name = command[0].upper()
    if name == b"HELLO":
        return b"%%1\r\n$5\r\nproto\r\n:%s\r\n" % (command[1] if len(command) > 1 else b"2")
    if name == b"PING":
        return b"+PONG\r\n"
    if name == b"CLIENT":
        return b"+OK\r\n"
    if name == b"INFO":
        return b"$%d\r\n%s\r\n" % (len(info), info)
    return None


class ScriptedServer:
    """See the module docstring; ``url`` to connect, ``stop`` to close every connection."""

    def __init__(self, answer: Answer, info: bytes = INFO) -> None:
        self._answer, self._info = answer, info
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="scripted-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        try:
            while (command := _read_command(reader)) is not None:
                reply = _handshake(command, self._info)
                for chunk in [reply] if reply is not None else self._answer(command):
                    connection.sendall(chunk)
        except OSError:
            pass  # the client hung up, or the server stopped
        finally:
            connection.close()

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # already gone
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()


def _read_command(reader: BinaryIO) -> list[bytes] | None:
    """One command (an array of bulk strings, as clients send them), or ``None`` at the end of the stream."""
    header = reader.readline()
    if not header:
        return None
    command = []
    for _ in range(int(header[1:])):
        size = int(reader.readline()[1:])
        command.append(reader.read(size + 2)[:size])
    return command
