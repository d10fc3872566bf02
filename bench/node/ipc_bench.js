// Node to Node IPC round trips, the reference for examples/ipc_bench.rs:
// node ipc_bench.js messages|handles SECS WINDOW -> prints "rate=<round trips per second>"
// A parent forks itself as the child; WINDOW messages in flight; "handles"
// sends one connected socket with each message (keepOpen), the child closes
// its copy and answers.
'use strict';
const { fork } = require('child_process');
const net = require('net');
const [mode, secs, win] = process.argv.slice(2);
const window = +(win || 1);
if (process.send) {
  process.on('message', (m, h) => {
    if (h) h.destroy();
    process.send(m);
  });
  return;
}
const child = fork(__filename, [mode, secs], { execArgv: [] });
let n = 0;
let sent = 0;
let done = false;
let sock;
const end = Date.now() + +secs * 1000;
const start = process.hrtime.bigint();
function next() {
  if (done) return;
  if (Date.now() >= end) {
    done = true;
    const s = Number(process.hrtime.bigint() - start) / 1e9;
    console.log(`rate=${(n / s).toFixed(0)} count=${n} secs=${s.toFixed(3)}`);
    child.disconnect();
    if (sock) sock.destroy();
    if (server) server.close();
    return;
  }
  sent++;
  if (mode === 'handles') child.send({ n: sent }, sock, { keepOpen: true });
  else child.send({ n: sent, payload: 'ping' });
}
function start_() { for (let i = 0; i < window; i++) next(); }
child.on('message', () => { n++; next(); });
let server;
if (mode === 'handles') {
  server = net.createServer(() => {}).listen(0, '127.0.0.1', () => {
    sock = net.connect(server.address().port, '127.0.0.1', start_);
  });
} else {
  start_();
}
