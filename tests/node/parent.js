// A Node parent for the IPC interop tests: forks the Rust test binary as a
// helper (`node parent.js <test binary> <helper name> <ending>`) and drives
// it through messages and handles both ways. Prints `STEP ...` lines, then
// `PASS ...` on success; `FAIL ...` and exit 1 otherwise.
//
// Endings: `rust-disconnect` (the Rust child disconnects and exits 0),
// `node-disconnect` (we disconnect; the Rust child exits 3 to show it saw
// it), `exit7` (the Rust child exits 7), `advanced` (fork with
// serialization: 'advanced'; the Rust child must refuse it and exit 0).
'use strict';
const assert = require('assert');
const { fork } = require('child_process');
const net = require('net');

const [exe, helper, ending] = process.argv.slice(2);
const steps = [];
function step(s) {
  steps.push(s);
  console.log('STEP ' + s);
}
function fail(e) {
  console.log('FAIL ' + ((e && e.stack) || e) + ' after ' + steps.join(','));
  process.exit(1);
}
process.on('uncaughtException', fail);
const timer = setTimeout(() => fail('timeout'), 30000);

const child = fork(helper, ['--exact', '--nocapture', '--test-threads=1'], {
  execPath: exe,
  execArgv: [],
  serialization: ending === 'advanced' ? 'advanced' : 'json',
  env: { ...process.env, UVCLUSTER_TEST_HELPER: helper },
});
let disconnects = 0;
child.on('disconnect', () => {
  disconnects++;
  step('disconnect');
});
child.on('exit', (code, signal) => {
  step(`exit:${code}:${signal}`);
  const want = { 'rust-disconnect': 0, 'node-disconnect': 3, exit7: 7, advanced: 0 }[ending];
  assert.strictEqual(code, want, `exit code for ${ending}`);
  assert.strictEqual(disconnects, 1, 'disconnect events');
  clearTimeout(timer);
  console.log('PASS ' + steps.join(','));
});

const nested = { nested: [1, { a: 'ünïcødé ✓ 😀' }], n: null, t: true };
const big = 'ü'.repeat(1 << 19); // 1 MiB of UTF-8
let raws = [];
let socketSteps = 0;
let pinger = null;

function socketStep(what) {
  step(what);
  if (++socketSteps === 2) child.send({ op: 'send-back' });
}

child.on('message', (msg, handle) => {
  switch (msg.op) {
    case 'ready':
      assert.deepStrictEqual(msg.env, { fd: false, mode: false }, 'env in the Rust child');
      step('ready');
      child.send('top-level string');
      child.send(42);
      child.send(null);
      child.send({ op: 'echo', payload: nested });
      break;
    case 'raw':
      raws.push(msg.payload);
      break;
    case 'echo':
      if (typeof msg.payload === 'string') {
        assert.strictEqual(msg.payload, big);
        step('echo-big');
        sendServer();
      } else {
        assert.deepStrictEqual(raws, ['top-level string', 42, null]);
        assert.deepStrictEqual(msg.payload, nested);
        step('echo');
        child.send({ op: 'echo', payload: big });
      }
      break;
    case 'listening': {
      step('listening');
      const c = net.connect(msg.port, '127.0.0.1');
      let got = '';
      c.on('data', (d) => (got += d));
      c.on('end', () => {
        assert.strictEqual(got, 'hello from rust\n');
        step('served');
        sendSocket();
      });
      break;
    }
    case 'socket-reading':
      pinger.write('ping from node\n');
      break;
    case 'socket-done':
      socketStep('socket-done');
      break;
    case 'here': {
      assert(handle instanceof net.Socket, 'a net.Socket from Rust');
      let got = '';
      handle.on('data', (d) => (got += d));
      handle.on('end', () => {
        assert.strictEqual(got, 'data from rust\n');
        step('here');
        handle.destroy();
        finish();
      });
      break;
    }
    default:
      fail('unexpected ' + JSON.stringify(msg));
  }
});

function sendServer() {
  // A listening server: the Rust child accepts on it; we stop listening.
  const server = net.createServer(() => fail('the parent accepted'));
  server.listen(0, '127.0.0.1', () => {
    child.send({ op: 'server', port: server.address().port }, server, (err) => {
      if (err) fail(err);
      server.close();
    });
  });
}

function sendSocket() {
  // A connected socket: the Rust child reads our ping and answers.
  const server = net.createServer((sock) => {
    server.close();
    child.send({ op: 'socket' }, sock);
  });
  server.listen(0, '127.0.0.1', () => {
    // Ping only once the Rust child reads: until our copy of the socket is
    // closed on the ACK, Node keeps reading it (and drops what it reads).
    const c = net.connect(server.address().port, '127.0.0.1');
    pinger = c;
    let got = '';
    c.on('data', (d) => (got += d));
    c.on('end', () => {
      assert.strictEqual(got, 'pong from rust\n');
      c.destroy();
      socketStep('pong');
    });
  });
}

function finish() {
  if (ending === 'rust-disconnect') child.send({ op: 'disconnect' });
  else if (ending === 'node-disconnect') child.disconnect();
  else if (ending === 'exit7') child.send({ op: 'exit', code: 7 });
}
