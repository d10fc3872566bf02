// test-cluster-fork-stdio: a worker started with stdio
// ['pipe','pipe','pipe','ipc','pipe'] echoes what arrives on fd 4.
'use strict';
const net = require('net');
const s = new net.Socket({ fd: 4, readable: true, writable: true });
s.on('data', (d) => s.write(d));
s.on('end', () => s.end());
