// A Node cluster worker for tests/cluster_primary.rs. What it does is
// chosen by environment variables:
//   SERVER=http|net|none   the server to run (default http): http replies
//                          with the pid as body, net writes the pid and ends
//   LISTEN=<port>|<path>   what to listen on (default 0); a value with a
//                          '/' is a Unix socket path
//   HOST=<ip>              listen host (default: none)
//   LISTEN_FD=<n>          listen({fd: n}): an fd of the primary
//   MAX_CONN=<n>           server.maxConnections
//   STALL=1                after the first request, report and busy-loop
//   HOLD=1                 net: write the pid but keep the connection open
//   REPORT=1               report each connection ({op:'conn', n})
// It echoes user messages ({op:'echo'}), reports listen errors over IPC,
// and retries on {op:'retry'}.
'use strict';
const cluster = require('cluster');
const http = require('http');
const net = require('net');

if (!cluster.isWorker) throw new Error('run me as a cluster worker');

const kind = process.env.SERVER || 'http';
const listenOn = process.env.LISTEN || '0';
const host = process.env.HOST || undefined;
let conns = 0;

function handler(sendBody) {
  conns++;
  if (process.env.REPORT) process.send({ op: 'conn', n: conns });
  if (process.env.STALL && conns === 1) {
    sendBody(() => {
      process.send({ op: 'stalled' }, () => { for (;;); });
    });
  } else {
    sendBody(() => {});
  }
}

function makeServer() {
  let server;
  if (kind === 'http') {
    server = http.createServer((req, res) => {
      handler((done) => {
        res.setHeader('connection', 'close');
        res.end(String(process.pid), done);
      });
    });
  } else {
    server = net.createServer((sock) => {
      sock.on('error', () => {});
      if (process.env.HOLD) handler((done) => sock.write(String(process.pid), done));
      else handler((done) => sock.end(String(process.pid), done));
    });
  }
  if (process.env.MAX_CONN) server.maxConnections = +process.env.MAX_CONN;
  return server;
}

function listen() {
  if (kind === 'none') return;
  const server = makeServer();
  server.on('error', (err) => {
    process.send({ op: 'error', code: err.code, errno: err.errno, syscall: err.syscall });
  });
  const cb = () => {
    const a = server.address();
    process.send({ op: 'listening', port: typeof a === 'string' ? a : a.port });
  };
  if (process.env.LISTEN_FD) server.listen({ fd: +process.env.LISTEN_FD }, cb);
  else if (listenOn.includes('/')) server.listen(listenOn, cb);
  else if (host) server.listen(+listenOn, host, cb);
  else server.listen(+listenOn, cb);
}

process.on('message', (msg) => {
  if (msg.op === 'echo') process.send({ op: 'echo', payload: msg.payload, id: cluster.worker.id });
  else if (msg.op === 'retry') listen();
  else if (msg.op === 'exit') process.exit(msg.code);
  else if (msg.op === 'disconnect') cluster.worker.disconnect();
});

process.send({ op: 'ready', pid: process.pid, id: cluster.worker.id, uid: process.env.NODE_UNIQUE_ID || null, extra: process.env.EXTRA || null });
listen();
