// A cluster worker that writes 200,000 malformed lines straight onto its IPC fd.
const fs = require('fs');
const fd = 3;
const line = Buffer.from('garbage{\n');
let left = 200000, chunk = Buffer.concat(Array(1000).fill(line));
function go() {
  while (left > 0) {
    try { fs.writeSync(fd, chunk); left -= 1000; }
    catch (e) { if (e.code === 'EAGAIN') return setImmediate(go); console.error('worker:', e.code); process.exit(0); }
  }
  setTimeout(() => process.exit(0), 500);
}
go();
