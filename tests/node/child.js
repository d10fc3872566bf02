// A Node child for the IPC interop tests: echoes user messages, uses handles
// it is sent, and sends handles back on request.
'use strict';
const dgram = require('dgram');
const net = require('net');

process.on('message', (msg, handle) => {
  if (msg && msg.op === 'echo') {
    process.send({ op: 'echo', payload: msg.payload });
  } else if (msg && msg.op === 'server') {
    // A listening TCP server handle: accept one connection, reply, report.
    const server = net.createServer((sock) => {
      sock.end(`hello from node ${process.pid}\n`);
      server.close();
      process.send({ op: 'served' });
    });
    server.listen(handle, () => process.send({ op: 'listening' }));
  } else if (msg && msg.op === 'tagged') {
    // A connected socket sent with a tag: write the tag on it, end it.
    handle.end(`${msg.tag}\n`);
    process.send({ op: 'tagged-done' });
  } else if (msg && msg.op === 'socket') {
    handle.end('node got your socket\n');
    process.send({ op: 'socket-done' });
  } else if (msg && msg.op === 'send-back') {
    // Make a connected socket and send it to the parent.
    const server = net.createServer((sock) => {
      sock.end('from node via rust\n');
      server.close();
    });
    server.listen(0, '127.0.0.1', () => {
      const c = net.connect(server.address().port, '127.0.0.1', () => {
        process.send({ op: 'here' }, c);
      });
    });
  } else if (msg && msg.op === 'env') {
    // Node deletes the channel variables at bootstrap.
    process.send({
      op: 'env',
      fd: 'NODE_CHANNEL_FD' in process.env,
      mode: 'NODE_CHANNEL_SERIALIZATION_MODE' in process.env,
    });
  } else if (msg && msg.op === 'dgram') {
    // A bound UDP socket (dgram.Socket): receive one datagram on it.
    const ok = handle instanceof dgram.Socket;
    handle.on('message', (data) => {
      handle.close();
      process.send({ op: 'dgram-got', data: data.toString(), ok });
    });
    process.send({ op: 'dgram-ready', port: handle.address().port });
  } else if (msg && msg.op === 'disconnect') {
    process.disconnect();
  } else if (msg && msg.op === 'exit') {
    process.exit(msg.code);
  }
});
process.on('disconnect', () => {
  // Exit on our own once the parent is gone.
});
process.send({ op: 'ready', pid: process.pid });
