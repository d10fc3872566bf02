// Node's own restart pattern, the primary of Node's cluster documentation
// and of most tutorials: fork WORKERS (default 2) workers running
// `http_app.js` and fork a new one whenever one exits
// (`cluster.on('exit', () => cluster.fork())`). Prints `ready` once the
// first WORKERS workers listen. The kill and restart-latency rows of
// `reload_proof` run it beside `uvcluster run` and PM2.
'use strict';
const cluster = require('cluster');
const path = require('path');

const n = +(process.env.WORKERS || 2);
cluster.setupPrimary({ exec: path.join(__dirname, 'http_app.js') });
for (let i = 0; i < n; i++) cluster.fork();

let listening = 0;
cluster.on('listening', () => {
  if (++listening === n) console.log('ready');
});
cluster.on('exit', (worker, code, signal) => {
  console.error(`worker ${worker.process.pid} died (${signal || code}); forking another`);
  cluster.fork();
});
