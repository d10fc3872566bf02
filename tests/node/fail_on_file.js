// A Node app for cli/tests/control.rs: serves `hi` on PORT, unless the
// file named by BROKEN exists, when it exits 1 at once (new code that
// cannot start: a reload must fail closed and keep the old workers).
'use strict';
const fs = require('fs');
const http = require('http');

if (process.env.BROKEN && fs.existsSync(process.env.BROKEN)) process.exit(1);
http.createServer((req, res) => res.end('hi')).listen(Number(process.env.PORT));
