// issue 10: a Node primary forks one cluster worker, `node
// surrogate_primary.js <worker binary | node> <handle|plain>`. Once it
// listens, the primary sends it {note: 'a\ud800b'} (with a net.Server
// handle, or alone), then makes 3 HTTP requests to it. A worker that never
// answers the handle stalls the primary's queue for it, `newconn` included,
// and answers nothing. With `node`, the worker is this script (Node's own
// worker: the reference). Prints `RESULT <json>`: answered, and what the
// worker reported getting.
'use strict';
const cluster = require('cluster');
const http = require('http');
const net = require('net');

if (cluster.isWorker) {
  process.on('message', (m, h) => {
    if (h) h.close();
    if (m && m.note) process.send({ got: m.note, handle: !!h, is_exact: true });
  });
  http.createServer((req, res) => res.end('hello world\n')).listen(+process.env.PORT);
  return;
}

// With a helper name, the worker is that helper of the Rust test binary.
const [bin, mode, helper] = process.argv.slice(2);
if (bin !== 'node') process.execPath = bin;
cluster.setupPrimary({
  exec: bin === 'node' ? __filename : helper || 'worker',
  execArgv: [],
  args: helper ? ['--exact', '--nocapture', '--test-threads=1'] : [],
});
const seen = { answered: 0, errors: 0, messages: [] };
const w = cluster.fork({ PORT: '0', ...(helper ? { UVCLUSTER_TEST_HELPER: helper } : {}) });
w.on('message', (m) => seen.messages.push({ ...m, exact_note: m.got === 'a\ud800b' }));
w.on('listening', (addr) => {
  const server = net.createServer();
  server.listen(0, '127.0.0.1', () => {
    if (mode === 'handle') w.send({ note: 'a\ud800b' }, server, () => server.close());
    else {
      w.send({ note: 'a\ud800b' });
      server.close();
    }
    let done = 0;
    for (let i = 0; i < 3; i++) {
      http
        .get({ host: '127.0.0.1', port: addr.port, agent: false, headers: { Connection: 'close' } }, (res) => {
          let body = '';
          res.on('data', (d) => (body += d));
          res.on('end', () => {
            if (res.statusCode === 200 && body === 'hello world\n') seen.answered++;
            if (++done === 3) finish();
          });
        })
        .on('error', () => {
          seen.errors++;
          if (++done === 3) finish();
        });
    }
  });
});
function finish() {
  // The worker's own message, if any, was sent before it answered.
  setImmediate(() => {
    console.log('RESULT ' + JSON.stringify(seen));
    w.kill();
  });
}
// Past this the worker is taken to answer nothing: report what was seen.
setTimeout(() => {
  console.log('RESULT ' + JSON.stringify({ ...seen, timeout: true }));
  process.exit(0);
}, 10000).unref();
