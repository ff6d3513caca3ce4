// A Node.js HTTP server under `reborn run` (or systemd socket activation).
//
// It takes its listening socket from fd 3 (LISTEN_FDS, checked against LISTEN_PID),
// reports READY=1 once it listens (Node has no Unix datagram sockets, so through
// `systemd-notify --ready`, Debian package `systemd`), and on SIGTERM stops accepting,
// finishes the requests in flight, closes its idle keep-alive connections, and exits.
//
//     reborn run --listen http=127.0.0.1:8080 -- node server.js
//     curl http://127.0.0.1:8080/
//     reborn upgrade --name node
'use strict';

const http = require('node:http');
const { execFile } = require('node:child_process');

if (process.env.LISTEN_PID !== String(process.pid) || Number(process.env.LISTEN_FDS) < 1) {
  console.error('server.js: no socket was passed to this process (LISTEN_FDS, LISTEN_PID): '
    + 'run it under `reborn run --listen ... -- node server.js` or a systemd socket unit');
  process.exit(2);
}

const server = http.createServer((req, res) => {
  const body = `hello from pid ${process.pid}\n`;
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

server.listen({ fd: 3 }, () => {
  execFile('systemd-notify', ['--ready'], (err) => {
    if (err) console.error(`server.js: systemd-notify --ready failed: ${err.message}`);
  });
});

process.on('SIGTERM', () => {
  // Stops accepting; idle keep-alive connections are closed, busy ones after their answer.
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
