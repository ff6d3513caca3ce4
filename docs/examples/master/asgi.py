"""An ASGI application for uvicorn under `reborn run` (or systemd socket activation).

uvicorn takes the socket the master passes as fd 3 (`--fd 3`); it does not report
readiness itself, so the application does, from its lifespan startup: READY=1 on
NOTIFY_SOCKET. (Connections that arrive before uvicorn accepts wait in the socket's
queue: nothing is refused.) On SIGTERM uvicorn stops accepting, finishes the requests
in flight, closes its idle keep-alive connections, and exits.

    reborn run --listen http=127.0.0.1:8000 -- uvicorn --fd 3 asgi:app
    curl http://127.0.0.1:8000/
    reborn upgrade --name uvicorn
"""

import os
import socket


def notify(message):
    """Sends one datagram to NOTIFY_SOCKET (a path, or @name for the abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                notify("READY=1")
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = ("hello from pid %d\n" % os.getpid()).encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
