// The seed's visit counter, as a Node cluster worker (cli/tests/broadcast.rs):
// each worker counts the visits it serves and tells the others with
// process.send; a primary that relays every worker's messages to every
// other worker (`uvcluster run --broadcast`, or Node's classic
// `worker.on('message', m => ...send(m))` primary) keeps every worker's
// count equal to the total. GET /count answers {pid, visits, served}.
'use strict';
const http = require('http');

let visits = 0;
let served = 0;
process.on('message', (m) => {
  if (m && m.cmd === 'visit') visits += 1;
});

http.createServer((req, res) => {
  if (req.url === '/count') {
    res.end(JSON.stringify({ pid: process.pid, visits, served }));
    return;
  }
  visits += 1;
  served += 1;
  process.send({ cmd: 'visit' });
  res.end(`visit ${visits}\n`);
}).listen(Number(process.env.PORT));
