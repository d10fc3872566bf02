// A Node cluster worker for tests/supervisor_broadcast.rs (the relay's
// bound): listens on port 0 (shared through the primary), and on
//   {"flood": ID, "n": N, "tag": T}  if ID is its own id, sends N messages
//                                    {"pad": 10 KB, "from": ID, "tag": T}
//   a relayed {"pad", "tag": "after"} reports {"gotAfter": ITS ID}
// Other relayed messages are read and ignored.
'use strict';
const cluster = require('cluster');
const http = require('http');

if (!cluster.isWorker) throw new Error('run me as a cluster worker');
const id = cluster.worker.id;
http.createServer((req, res) => res.end('hi\n')).listen(0);
const pad = 'x'.repeat(10 * 1024);
process.on('message', (m) => {
  if (m && m.flood === id) {
    for (let i = 0; i < m.n; i++) process.send({ pad, from: id, tag: m.tag });
  } else if (m && m.pad !== undefined && m.tag === 'after') {
    process.send({ gotAfter: id });
  }
});
