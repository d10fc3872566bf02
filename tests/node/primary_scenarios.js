// A real Node primary driving one Rust worker (this test binary re-run as a
// helper) through one scenario: node primary_scenarios.js <test binary> <scenario>
// Prints one JSON line with what the primary saw.
'use strict';
const cluster = require('cluster');
const net = require('net');
const [bin, scenario] = process.argv.slice(2);
process.execPath = bin;
cluster.setupPrimary({
  exec: 'helper_' + scenario,
  execArgv: [],
  args: ['--exact', '--nocapture', '--test-threads=1'],
  silent: true,
});
const seen = { events: [], messages: [] };
let blocker;
function fork() {
  const w = cluster.fork({ UVCLUSTER_TEST_HELPER: 'helper_' + scenario, PORT: String(seen.port || 0) });
  w.on('message', (m) => {
    seen.messages.push(m);
    if (m && m.op === 'retry-me') {
      blocker.close(() => w.send({ op: 'retry' }));
    }
    if (m && m.op === 'udp') {
      const d = require('dgram').createSocket('udp4');
      d.send('hello over udp', m.port, '127.0.0.1', () => d.close());
    }
    if (m && m.op === 'echo-me') {
      w.send({ op: 'echo', payload: m.payload });
    }
  });
  w.on('listening', (addr) => seen.events.push(`listening ${addr.port > 0}`));
  w.on('online', () => seen.events.push('online'));
  w.on('disconnect', () => seen.events.push(`disconnect ${w.exitedAfterDisconnect}`));
  w.on('exit', (code, signal) => {
    seen.events.push(`exit ${code} ${signal} ${w.exitedAfterDisconnect}`);
    console.log(JSON.stringify(seen));
    process.exit(0);
  });
}
if (scenario === 'eaddrinuse') {
  blocker = net.createServer().listen(0, () => {
    seen.port = blocker.address().port;
    fork();
  });
} else {
  fork();
}
setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', seen })); process.exit(1); }, 20000).unref();
