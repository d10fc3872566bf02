// A real Node primary running Rust workers (the cluster_hello example):
// node primary.js <worker binary> <rr|none> <workers>
// Prints one JSON line with what it saw, then exits 0 (or 1 on a failure).
'use strict';
const cluster = require('cluster');
const http = require('http');
const [bin, policy, nstr] = process.argv.slice(2);
const n = +nstr;
cluster.schedulingPolicy = policy === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
process.execPath = bin;
cluster.setupPrimary({ exec: 'worker', execArgv: [], args: [] });
const events = [];
const seen = { listening: 0, ports: new Set(), counts: {}, exits: {} };
cluster.on('fork', (w) => events.push(`fork ${w.id}`));
cluster.on('online', (w) => events.push(`online ${w.id}`));
cluster.on('disconnect', (w) => events.push(`disconnect ${w.id}`));
cluster.on('exit', (w, code, signal) => {
  events.push(`exit ${w.id}`);
  seen.exits[w.id] = { code, signal, exitedAfterDisconnect: w.exitedAfterDisconnect };
  if (Object.keys(seen.exits).length === n) finish();
});
cluster.on('listening', (w, addr) => {
  events.push(`listening ${w.id}`);
  seen.ports.add(addr.port);
  seen.addr = addr;
  if (++seen.listening === n) run(addr.port);
});
cluster.on('message', (w, m) => {
  if (m && m.conns !== undefined) {
    seen.counts[w.id] = m.conns;
    if (Object.keys(seen.counts).length === n) stop();
  }
});
for (let i = 0; i < n; i++) cluster.fork({ PORT: '0' });

function run(port) {
  const total = 40;
  let done = 0;
  for (let i = 0; i < total; i++) {
    http.get({ host: '127.0.0.1', port, agent: false, headers: { Connection: 'close' } }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d));
      res.on('end', () => {
        if (body !== 'hello world\n' || res.statusCode !== 200) fail('bad response ' + body);
        if (++done === total) {
          for (const id in cluster.workers) cluster.workers[id].send('count');
        }
      });
    }).on('error', fail);
  }
}

function stop() {
  // Worker 1: primary-initiated disconnect; the others: kill (a signal only in v20).
  for (const id in cluster.workers) {
    const w = cluster.workers[id];
    if (w.id === 1) w.disconnect();
    else w.kill();
  }
}

function finish() {
  console.log(JSON.stringify({ events, ports: [...seen.ports], counts: seen.counts, exits: seen.exits, addr: seen.addr }));
  process.exit(0);
}
function fail(e) {
  console.log(JSON.stringify({ error: String(e), events }));
  process.exit(1);
}
setTimeout(() => fail('timeout'), 20000).unref();
