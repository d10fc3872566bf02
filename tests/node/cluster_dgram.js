// A Node cluster worker that binds a UDP socket on port 0 through the
// primary and reports each datagram over IPC.
'use strict';
const cluster = require('cluster');
const dgram = require('dgram');

const sock = dgram.createSocket('udp4');
sock.on('message', (data) => process.send({ op: 'dgram', data: data.toString(), id: cluster.worker.id }));
sock.on('error', (err) => process.send({ op: 'error', code: err.code }));
sock.bind(0, '127.0.0.1', () => process.send({ op: 'bound', port: sock.address().port }));
process.on('message', (msg) => {
  if (msg.op === 'close') sock.close();
});
