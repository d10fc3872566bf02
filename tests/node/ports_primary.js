// A real Node primary for tests/cluster_node_*.rs: ports of the primary
// half of Node's test/parallel/test-cluster-*.js, with Rust workers (the
// test binary re-run as helper_<scenario>).
//   node ports_primary.js <test binary> <scenario> [extra...]
// Asserts with node:assert (a failure exits non-zero) and prints one JSON
// line with what it saw.
'use strict';
const assert = require('assert');
const cluster = require('cluster');
const fs = require('fs');
const net = require('net');

const [bin, scenario, ...extra] = process.argv.slice(2);
process.execPath = bin;
const helper = 'helper_' + scenario;
const testArgs = ['--exact', '--nocapture', '--test-threads=1'];

function setup(more) {
  cluster.setupPrimary({ exec: helper, execArgv: [], args: testArgs, silent: true, ...more });
}
function fork(env) {
  return cluster.fork({ UVCLUSTER_TEST_HELPER: helper, ...env });
}
function done(v) {
  console.log(JSON.stringify(v));
  process.exit(0);
}
setTimeout(() => {
  console.error('timeout in scenario ' + scenario);
  process.exit(1);
}, 20000).unref();

const scenarios = {
  // test-cluster-basic.
  basic() {
    setup();
    const states = [];
    const seen = [];
    for (const ev of ['fork', 'online', 'listening', 'exit']) {
      cluster.on(ev, (w) => {
        assert.strictEqual(w.id, 1);
        seen.push('cluster:' + ev);
      });
    }
    const w = fork();
    states.push(w.state);
    w.on('online', () => { states.push(w.state); seen.push('worker:online'); });
    w.on('listening', (addr) => {
      states.push(w.state);
      seen.push('worker:listening');
      assert.deepStrictEqual(Object.keys(addr).sort(), ['address', 'addressType', 'fd', 'port']);
      assert.strictEqual(addr.address, null);
      assert.strictEqual(addr.addressType, 4);
      assert.strictEqual(addr.fd, undefined);
      assert.strictEqual(typeof addr.port, 'number');
      assert(addr.port > 0);
      // A connection through the primary reaches the Rust worker.
      const c = net.connect(addr.port, '127.0.0.1');
      c.on('error', () => {});
      c.on('close', () => w.process.kill('SIGTERM'));
      c.resume();
    });
    w.on('exit', (code, signal) => {
      states.push(w.state);
      seen.push('worker:exit');
      assert.strictEqual(code, null);
      assert.strictEqual(signal, 'SIGTERM');
      assert.deepStrictEqual(states, ['none', 'online', 'listening', 'dead']);
      setImmediate(() => {
        assert.deepStrictEqual(seen.sort(), [
          'cluster:exit', 'cluster:fork', 'cluster:listening', 'cluster:online',
          'worker:exit', 'worker:listening', 'worker:online',
        ]);
        done({ ok: true });
      });
    });
  },
  // test-cluster-worker-init, invalid-message, fork-env, cwd, setup-primary.
  init() {
    setup({ cwd: extra[0], args: [...testArgs, 'custom-arg'] });
    process.env.A = 'primary-env';
    process.env.B = 'primary-env';
    const w = fork({ B: 'fork' });
    const out = {};
    w.on('online', () => {
      assert.strictEqual(w.send({ cmd: 'NODE_CLUSTER', ack: -1 }), true);
      assert.strictEqual(w.send({ op: 'hello' }), true);
    });
    w.on('message', (m) => {
      out.reply = m;
      assert.strictEqual(w.disconnect(), w);
    });
    w.on('exit', (code, signal) => {
      out.exit = [code, signal];
      assert.strictEqual(w.exitedAfterDisconnect, true);
      done(out);
    });
  },
  // test-cluster-primary-kill: report the worker's pid, then exit.
  primary_kill() {
    setup();
    const w = fork();
    w.on('message', (m) => done({ pid: m.pid }));
  },
  // Lifecycle of Rust workers: worker-disconnect, worker-forced-exit,
  // worker-kill, kill-signal, kill-infinite-loop, worker-death,
  // process-disconnect.
  lifecycle() {
    setup();
    const exits = {};
    const cases = {
      disconnect: (w) => w.disconnect(),
      raw: (w) => w.process.disconnect(),
      sigkill: (w) => w.kill('SIGKILL'),
      sigterm: (w) => w.process.kill(),
      exit42: null,
      process_disconnect: null,
      busy: null,
    };
    let left = Object.keys(cases).length - 1;
    for (const [name, act] of Object.entries(cases)) {
      const how = name === 'sigterm' ? 'busy' : name;
      if (name === 'busy') continue;
      const w = fork({ HOW: how });
      // 'disconnect' and 'exit' come in either order: one of each.
      let events = 0;
      const both = () => {
        if (++events === 2 && --left === 0) done({ exits });
      };
      w.once('disconnect', () => {
        assert.strictEqual(w.isConnected(), false);
        both();
      });
      w.on('listening', () => { if (act) setImmediate(() => act(w)); });
      w.once('exit', (code, signal) => {
        assert.strictEqual(w.isDead(), true);
        exits[name] = [code, signal, w.exitedAfterDisconnect];
        both();
      });
    }
  },
  // test-cluster-advanced-serialization: refused by the Rust worker.
  advanced() {
    setup({ serialization: 'advanced' });
    const w = fork();
    w.on('exit', (code, signal) => done({ exit: [code, signal] }));
  },
  // Group E with Rust workers (helper_dgram, MODE = extra[0]).
  dgram() {
    const dgram = require('dgram');
    const mode = extra[0];
    setup();
    const out = { listening: 0 };
    cluster.on('listening', () => out.listening++);
    const exits = [];
    const finish = () => cluster.disconnect(() => done(out));
    if (mode === 'recv') {
      // test-cluster-dgram-1.
      const ports = new Set();
      let bound = 0;
      out.received = [];
      for (let i = 0; i < 4; i++) fork({ MODE: 'recv' });
      cluster.on('message', (w, m) => {
        if (m.op === 'bound') {
          ports.add(m.port);
          if (++bound === 4) {
            const tx = dgram.createSocket('udp4');
            let left = 40;
            for (let i = 0; i < 40; i++) tx.send('d' + i, m.port, '127.0.0.1', () => { if (--left === 0) tx.close(); });
          }
        } else if (m.op === 'received') {
          out.received.push(m.n);
          if (out.received.length === 4) { out.ports = [...ports]; finish(); }
        }
      });
    } else if (mode === 'send') {
      // test-cluster-dgram-2.
      const rx = dgram.createSocket('udp4');
      out.got = 0;
      let sent = 0;
      // Finish once every datagram and both workers' `sent` are in.
      const check = () => { if (out.got === 20 && sent === 2) finish(); };
      cluster.on('message', (w, m) => { if (m.op === 'sent') { sent++; check(); } });
      rx.on('message', () => { if (++out.got === 20) { rx.close(); check(); } });
      rx.bind(0, '127.0.0.1', () => {
        for (let i = 0; i < 2; i++) fork({ MODE: 'send', PORT: String(rx.address().port) });
      });
    } else if (mode === 'unshared') {
      // test-cluster-disconnect-unshared-udp.
      const unbound = fork({ MODE: 'idle' });
      const record = (w) => w.on('exit', (code, signal) => {
        exits[w.id - 1] = [code, signal];
        if (exits.filter(Boolean).length === 2) { out.exits = exits; done(out); }
      });
      record(unbound);
      unbound.on('online', () => {
        const bound = fork({ MODE: 'bind' });
        record(bound);
        bound.on('listening', () => {
          unbound.disconnect();
          unbound.on('disconnect', () => cluster.disconnect());
        });
      });
    } else {
      // dgram-ipv6only, dgram-reuse, child-index-dgram: one worker reports.
      const w = fork({ MODE: mode, PORT: extra[1] || '0' });
      w.on('message', (m) => { out.msg = m; w.disconnect(); });
      w.on('exit', (code, signal) => {
        assert.deepStrictEqual([code, signal], [0, null]);
        done(out);
      });
    }
  },
};

if (!scenarios[scenario]) throw new Error('unknown scenario ' + scenario);
scenarios[scenario]();
