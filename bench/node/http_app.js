// The Node app of the reload and restart benchmarks (`reload_proof`): an
// HTTP server answering every request `200` with the pid of the process
// that served it, in the `x-worker-pid` header and as the body, so that the
// load generator sees which worker answered (and when a new one starts to).
//
// It runs as a cluster worker of any primary (`uvcluster run -- node
// http_app.js`, Node's cluster in `refork_primary.js`, PM2's cluster mode),
// or alone. Environment:
//   PORT=<port>        where to listen (default 8000)
//   FAIL_MARKER=<path> if this file exists when the app starts, it exits 1
//                      before listening: a deploy whose new workers cannot
//                      start (the fail-closed reload scenario)
//
// Once listening it sends 'ready' to its primary when it has one (PM2's
// `process.send('ready')` convention, `--wait-ready`). On SIGINT (PM2's
// reload) or SIGTERM it stops as PM2's documentation recommends: it closes
// its server (idle keep-alive connections at once, the others once their
// response is sent) and exits when it has.
'use strict';
const fs = require('fs');
const http = require('http');

const marker = process.env.FAIL_MARKER;
if (marker && fs.existsSync(marker)) {
  console.error(`http_app: ${marker} exists: failing on start`);
  process.exit(1);
}

const pid = String(process.pid);
const server = http.createServer((req, res) => {
  res.writeHead(200, {
    'content-type': 'text/plain',
    'content-length': pid.length,
    'x-worker-pid': pid,
  });
  res.end(pid);
});

server.listen(+(process.env.PORT || 8000), () => {
  if (process.send) process.send('ready');
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
}
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
