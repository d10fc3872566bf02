// A real Node primary for tests/regressions.rs, started with a socket at
// fd 5 that it did not create: it forks one worker (this script), which
// reports its own fds; the primary prints one JSON line with its fds and
// the worker's, each fd number mapped to its /proc link, then exits.
'use strict';
const cluster = require('cluster');
const fs = require('fs');

function fds() {
  const out = {};
  for (const n of fs.readdirSync('/proc/self/fd')) {
    try {
      out[n] = fs.readlinkSync(`/proc/self/fd/${n}`);
    } catch {
      // The directory fd that readdirSync used is already closed.
    }
  }
  return out;
}

if (cluster.isPrimary) {
  const w = cluster.fork();
  w.on('message', (m) => {
    console.log(JSON.stringify({ primary: fds(), worker: m }));
    w.disconnect();
  });
} else {
  process.send(fds());
}
