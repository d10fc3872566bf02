// A Node parent that sends a Rust child (this test binary run as
// `helper_json_echo`) every kind of value JSON.stringify can write, and
// checks what comes back: node json_edges_parent.js <test binary>
//
// 1. Each edge value is sent as {op:'echo', v}; the child sends back the
//    exact text it got (RawMessage + send_raw). It must equal what a Node
//    echo peer would give back: JSON.parse(JSON.stringify(v)).
// 2. A message nested deeper than the child's limit is sent with a
//    net.Server handle, then {op:'after'}: Node queues 'after' until the
//    child answers the handle, so it arriving proves the child did.
// 3. The child sends its own values (an unpaired surrogate through
//    send_raw, numbers through send); node checks them.
// Prints `PASS <json report>` or `FAIL <reason>` (exit 1).
'use strict';
const { fork } = require('child_process');
const net = require('net');

const exe = process.argv[2];
function fail(e) {
  console.log('FAIL ' + ((e && e.stack) || e));
  process.exit(1);
}
process.on('uncaughtException', fail);
setTimeout(() => fail('timeout'), 30000).unref();

function nest(depth, leaf) {
  let v = leaf;
  for (let i = 0; i < depth; i++) v = i % 2 ? { k: v } : [v];
  return v;
}
let controls = '';
for (let c = 0; c < 0x20; c++) controls += String.fromCharCode(c);
const edges = [
  { note: 'a\ud800b' },
  '\udc00',
  ['\ud83d', '\ud83d\ude00', '\ude00\ud83d'],
  { '\ud800key': 1, b: 2, a: 1 },
  { b: 1, a: 2, z: { y: 1, x: [{ d: 1, c: 2 }] }, 10: 'ten', 2: 'two' },
  { controls, more: '\u007f\u2028\u2029"\\/' },
  [-0, 0, 1e21, 1e-7, 5e-324, 1.7976931348623157e308, 0.1, 100, 9007199254740993, 123456789.125],
  [Infinity, NaN, -Infinity],
  { __proto__: null, constructor: 'x', toString: 'y' },
  JSON.parse('{"__proto__": {"polluted": true}}'),
  nest(4000, 'deep \ud800'),
  'x'.repeat(1 << 20) + '\udfff',
  null,
  true,
  42,
];
const child = fork('helper_json_echo', ['--exact', '--nocapture', '--test-threads=1'], {
  execPath: exe,
  execArgv: [],
  env: { ...process.env, UVCLUSTER_TEST_HELPER: 'helper_json_echo' },
});
const report = { echoed: 0 };
let next = 0;
child.on('message', (m) => {
  switch (m.op) {
    case 'ready':
    case 'echo': {
      if (m.op === 'echo') {
        // Byte for byte what a Node echo peer gives back, keys in their
        // order included.
        const want = JSON.stringify(JSON.parse(JSON.stringify(edges[next])));
        const got = JSON.stringify(m.v);
        if (got !== want) fail(`edge ${next}: sent ${want.slice(0, 200)}, got back ${got.slice(0, 200)}`);
        report.echoed++;
        next++;
      }
      if (next < edges.length) {
        child.send({ op: 'echo', v: edges[next] });
      } else {
        // Deeper than the child's limit (4500), with a handle.
        const server = net.createServer();
        server.listen(0, '127.0.0.1', () => {
          child.send({ op: 'too-deep', v: nest(6000, 1) }, server, () => server.close());
          child.send({ op: 'after' });
        });
      }
      break;
    }
    case 'report':
      report.child = m;
      if (m.surrogate !== '\ud800' || m.surrogate.length !== 1) fail('send_raw lost the surrogate: ' + JSON.stringify(m.surrogate));
      child.disconnect();
      break;
    default:
      fail('unexpected ' + JSON.stringify(m).slice(0, 200));
  }
});
child.on('exit', (code, signal) => {
  if (code !== 0) fail(`child exit ${code} ${signal}`);
  console.log('PASS ' + JSON.stringify(report));
});
