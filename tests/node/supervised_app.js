// A Node cluster worker app for tests/supervisor_node.rs: an HTTP hello
// world on port 0 (shared through the primary), one request per
// connection. SUP_MODE picks its behaviour:
//   serve        serve (default)
//   crash        exit with code 3 at once
//   syntax       a syntax error at start-up (the "bad deploy")
//   wait-ready   serve, and send PM2's 'ready' message 200 ms (or
//                READY_DELAY_MS) after listening; until then every
//                response says `not-ready`
//   never-ready  serve, never send 'ready'
//   mute         serve with ordinary answers, never send 'ready' (an app
//                without PM2's convention run with --wait-ready)
//   linger       serve, and keep running after the disconnect (a timer)
'use strict';
const cluster = require('cluster');
const http = require('http');

if (!cluster.isWorker) throw new Error('run me as a cluster worker');

const mode = process.env.SUP_MODE || 'serve';
if (mode === 'crash') process.exit(3);
if (mode === 'syntax') new Function('return function (');
if (mode === 'linger') setInterval(() => {}, 1000);

// Whether it has said 'ready' (always, for the modes that do not wait).
let ready = mode !== 'wait-ready' && mode !== 'never-ready';
const server = http.createServer((req, res) => {
  res.setHeader('Connection', 'close');
  res.end(`hello from ${process.pid} ${ready ? 'ready' : 'not-ready'}\n`);
});
server.listen(0, () => {
  if (mode === 'wait-ready') {
    const delay = Number(process.env.READY_DELAY_MS || 200);
    setTimeout(() => {
      ready = true;
      process.send('ready');
    }, delay);
  }
});
