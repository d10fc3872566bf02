// A worker for tests/systemd_activation.rs and tests/systemd_notify.rs: an HTTP server on PORT (or the
// Unix socket LISTEN_PATH), answering each request with this process's pid
// and the systemd variables it sees (which the primary must have removed).
'use strict';
const http = require('http');
const vars = ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'];
const seen = {};
for (const v of vars) if (process.env[v] !== undefined) seen[v] = process.env[v];
const server = http.createServer((req, res) => {
  res.setHeader('Connection', 'close');
  res.end(JSON.stringify({ pid: process.pid, env: seen }) + '\n');
});
function listen() {
  if (process.env.LISTEN_PATH) server.listen(process.env.LISTEN_PATH);
  else server.listen(Number(process.env.PORT), process.env.HOST || undefined);
}
// HOLD_WORKER=N: worker N says it holds, and listens only on SIGUSR2 (the
// notify test checks that READY=1 waits for it).
const id = String(require('cluster').worker?.id);
if (process.env.HOLD_WORKER && process.env.HOLD_WORKER === id) {
  process.on('SIGUSR2', listen);
  console.log(`holding ${process.pid}`);
} else {
  listen();
}
process.on('disconnect', () => server.close());
