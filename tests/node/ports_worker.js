// A Node cluster worker for tests/cluster_node_*.rs (ports of Node's
// test/parallel/test-cluster-*.js with a Rust primary). SCENARIO chooses
// what it does; it reports to the primary with {op: ...} messages.
'use strict';
const cluster = require('cluster');
const dgram = require('dgram');
const http = require('http');
const net = require('net');

if (!cluster.isWorker) throw new Error('run me as a cluster worker');
const scenario = process.env.SCENARIO || 'basic';
const send = (m, cb) => process.send(m, cb);

function netServer() {
  return net.createServer((s) => {
    s.on('error', () => {});
    s.end(String(process.pid));
  });
}

function reportErrors(server) {
  server.on('error', (e) => send({ op: 'error', code: e.code, errno: e.errno, syscall: e.syscall }));
  return server;
}

const scenarios = {
  // test-cluster-basic, fork-env, cwd, setup-primary: what the worker sees.
  basic() {
    send({
      op: 'env',
      uid: process.env.NODE_UNIQUE_ID === undefined ? null : process.env.NODE_UNIQUE_ID,
      isWorker: cluster.isWorker,
      isPrimary: cluster.isPrimary,
      id: cluster.worker.id,
      argv: process.argv.slice(2),
      cwd: process.cwd(),
      A: process.env.A || null,
      B: process.env.B || null,
      PATH: !!process.env.PATH,
    });
    const s = reportErrors(http.createServer((req, res) => res.end(String(process.pid))));
    s.listen(0, () => send({ op: 'listening', port: s.address().port }));
  },
  // An HTTP server on PORT answering with the pid (for the uvcluster CLI).
  http_port() {
    const s = reportErrors(http.createServer((req, res) => {
      res.setHeader('connection', 'close');
      res.end(String(process.pid));
    }));
    s.listen(+process.env.PORT);
  },
  // test-cluster-worker-init / worker-events / message: a message reaches
  // both cluster.worker and process; the reply reaches the primary.
  init() {
    const seen = { worker: 0, process: 0 };
    cluster.worker.on('message', (m) => { if (m.op === 'hello') seen.worker++; });
    process.on('message', (m) => {
      if (m.op !== 'hello') return;
      seen.process++;
      setImmediate(() => send({ op: 'hello-back', seen, sendReturned: true }));
    });
  },
  // test-cluster-invalid-message: {cmd:'NODE_CLUSTER', ack:-1} as a user
  // message is internal traffic with an unknown ack: ignored.
  invalid() {
    process.on('message', (m) => send({ op: 'unexpected', m }));
    send({ op: 'ready' });
  },
  // test-cluster-net-listen: listen() with no arguments.
  listen_noarg() {
    const s = reportErrors(netServer());
    s.listen(() => send({ op: 'listening', port: s.address().port }));
  },
  // test-cluster-net-listen-backlog.
  backlog() {
    const s = reportErrors(netServer());
    s.listen({ port: 0, backlog: 127 }, () => send({ op: 'listening', port: s.address().port }));
  },
  // test-cluster-net-listen-ipv6only-false.
  ipv6() {
    const s = reportErrors(netServer());
    s.listen({ port: 0, host: '::', ipv6Only: false }, () =>
      send({ op: 'listening', port: s.address().port, family: s.address().family }));
  },
  // test-cluster-listen-pipe-readable-writable.
  pipe_rw() {
    const s = reportErrors(netServer());
    s.listen({ path: process.env.SOCK, readableAll: true, writableAll: true }, () =>
      send({ op: 'listening' }));
  },
  // test-cluster-http-pipe.
  http_pipe() {
    const s = reportErrors(http.createServer((req, res) => {
      res.setHeader('connection', 'close');
      res.end(JSON.stringify({ remote: req.socket.remoteAddress === undefined ? 'undefined' : req.socket.remoteAddress }));
    }));
    s.listen(process.env.SOCK, () => send({ op: 'listening' }));
  },
  // test-cluster-child-index-net: two concurrent listen(0)s, then both
  // closed and re-listened.
  child_index() {
    const ports = [];
    const a = reportErrors(netServer());
    const b = reportErrors(netServer());
    let n = 0;
    const round = (then) => {
      let left = 2;
      for (const s of [a, b]) {
        s.listen(0, () => {
          ports.push(s.address().port);
          if (--left === 0) then();
        });
      }
    };
    round(() => {
      let closed = 0;
      for (const s of [a, b]) s.close(() => {
        if (++closed === 2) round(() => { n++; send({ op: 'done', ports }); });
      });
    });
  },
  // test-cluster-server-restart-*: close and re-listen on {op:'restart'}.
  restart() {
    const s = reportErrors(netServer());
    s.listen(0, () => send({ op: 'listening', port: s.address().port }));
    process.on('message', (m) => {
      if (m.op !== 'restart') return;
      s.close(() => s.listen(0, () => send({ op: 'relistening', port: s.address().port })));
    });
  },
  // test-cluster-worker-no-exit / wait-server-close: write the pid and
  // keep the connection open.
  hold() {
    const s = reportErrors(net.createServer((c) => {
      c.on('error', () => {});
      c.write(String(process.pid));
      c.on('end', () => c.end());
    }));
    s.listen(+(process.env.PORT || 0), () => send({ op: 'listening', port: s.address().port }));
  },
  // test-cluster-disconnect: two servers per worker.
  two_servers() {
    const ports = [];
    for (const p of [+process.env.PORT1, +process.env.PORT2]) {
      const s = reportErrors(netServer());
      s.listen(p, () => {
        ports.push(s.address().port);
        if (ports.length === 2) send({ op: 'listening2', ports });
      });
    }
  },
  // A server, then what EXIT_HOW says once it listens.
  listen_then() {
    const s = reportErrors(netServer());
    s.listen(+(process.env.PORT || 0), () => {
      const how = process.env.HOW;
      if (how === 'disconnect') cluster.worker.disconnect();
      else if (how === 'kill') cluster.worker.kill();
      else if (how === 'destroy') cluster.worker.destroy();
      else if (how === 'process_disconnect') process.disconnect();
      else if (how === 'exit42') setImmediate(() => process.exit(42));
      else if (how === 'disconnect_then_destroy') {
        cluster.worker.disconnect();
        cluster.worker.once('disconnect', () => cluster.worker.destroy());
      }
    });
    if (process.env.EXIT_IN_DISCONNECT) {
      cluster.worker.on('disconnect', () => {
        process.exit(42);
      });
    }
  },
  // Nothing: stays connected and idle.
  idle() {
    send({ op: 'ready', connected: cluster.worker.isConnected() });
    cluster.worker.on('disconnect', () => {
      if (process.env.EXIT_IN_DISCONNECT) process.exit(42);
    });
  },
  // test-cluster-kill-infinite-loop.
  loop() {
    send({ op: 'looping' }, () => { for (;;); });
  },
  // test-cluster-send-deadlock / send-handle-twice: connect to the
  // primary's PORT and send that socket to the primary (TWICE: twice);
  // sockets the primary sends are answered with "worker" and ended.
  send_socket() {
    process.on('message', (m, h) => {
      if (m.op === 'socket' && h) {
        h.end('worker');
        send({ op: 'got-socket' });
      }
    });
    const c = net.connect(+process.env.PORT, '127.0.0.1', () => {
      send({ op: 'socket', n: 1 }, c);
      if (process.env.TWICE) send({ op: 'socket', n: 2 }, c);
    });
    c.on('error', () => {});
  },
  // test-cluster-dgram-1: bind(0) shares one port; count datagrams.
  dgram() {
    const s = dgram.createSocket('udp4');
    let n = 0;
    s.on('message', () => {
      n++;
      send({ op: 'dgram', n });
    });
    s.bind(0, () => send({ op: 'bound', port: s.address().port }));
  },
  // test-cluster-dgram-bind-fd: bind({fd}) with an fd number of the
  // primary's fd table; report the port and each datagram.
  dgram_fd() {
    const s = dgram.createSocket('udp4');
    s.on('error', (e) => send({ op: 'error', code: e.code }));
    s.on('message', (d) => send({ op: 'dgram', data: String(d) }));
    s.bind({ fd: +process.env.FD }, () => send({ op: 'bound', port: s.address().port }));
  },
  // Bind errors: listen on LISTEN (a port or a path) and report.
  listen_on() {
    const s = reportErrors(netServer());
    const on = process.env.LISTEN;
    const cb = () => send({ op: 'listening', port: typeof s.address() === 'string' ? s.address() : s.address().port });
    if (on.includes('/')) s.listen(on, cb);
    else s.listen(+on, cb);
  },
};

if (!scenarios[scenario]) throw new Error('unknown SCENARIO ' + scenario);
scenarios[scenario]();
