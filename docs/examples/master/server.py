#!/usr/bin/env python3
"""A socket-activated HTTP server in plain Python (standard library only).

It runs under `reborn run` as it would under systemd: it takes its listening socket from
fd 3 (LISTEN_FDS, checked against LISTEN_PID), reports READY=1 on NOTIFY_SOCKET once it
accepts, and on SIGTERM stops accepting, finishes the requests in flight (answering them
with `Connection: close`), and exits.

    reborn run --listen http=127.0.0.1:8080 -- python3 server.py
    curl http://127.0.0.1:8080/
    reborn upgrade --name python3      # or: kill -HUP <master pid>
"""

import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SD_LISTEN_FDS_START = 3
draining = threading.Event()


def listen_fds():
    """The sockets passed by socket activation, if they are meant for this process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


def notify(message):
    """Sends one datagram to NOTIFY_SOCKET (a path, or @name for the abstract namespace)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # an idle keep-alive connection is closed after this long

    def do_GET(self):
        body = ("hello from pid %d\n" % os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    # Block the stop signals in every thread (threads inherit the mask) and wait for them
    # in this one with sigwait: a handler could run late or never while the main thread
    # sleeps and the signal lands on another thread.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    sockets = listen_fds()
    if not sockets:
        sys.exit("server.py: no socket from LISTEN_FDS; run it under `reborn run --listen ...`")
    server = ThreadingHTTPServer(sockets[0].getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sockets[0]  # never bind: the master owns the address
    server.daemon_threads = False  # server_close() waits for requests in flight
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    notify("READY=1\nSTATUS=serving\n")
    signal.sigwait(stop_signals)

    notify("STOPPING=1\nSTATUS=draining\n")
    draining.set()
    server.shutdown()  # stop accepting; the socket stays open in the next generation
    server.server_close()  # close() (never shutdown()) our copy, join the handlers


if __name__ == "__main__":
    main()
