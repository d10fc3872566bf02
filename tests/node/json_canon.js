// Reads JSON lines on stdin (decoded as Node's IPC channel decodes them) and
// prints, for each, what JSON.parse made of it in a canonical form:
// JSON.stringify of the value with unpaired surrogates replaced by U+FFFD
// (String.prototype.toWellFormed), object keys in the order JSON.parse made
// them (the Rust side keeps them in the order it read them).
// A line JSON.parse rejects prints `ERR <message>`.
'use strict';
const { StringDecoder } = require('string_decoder');

function norm(v) {
  if (typeof v === 'string') return v.toWellFormed();
  if (Array.isArray(v)) return v.map(norm);
  if (v !== null && typeof v === 'object') {
    // Keys in the order JSON.parse made them; after replacement two keys
    // may be one, and the later one wins, as in the Rust decoder.
    const entries = new Map();
    for (const k of Object.keys(v)) entries.set(k.toWellFormed(), norm(v[k]));
    const out = Object.create(null);
    for (const [k, val] of entries) out[k] = val;
    return out;
  }
  return v;
}

const decoder = new StringDecoder('utf8');
let text = '';
process.stdin.on('data', (d) => (text += decoder.write(d)));
process.stdin.on('end', () => {
  text += decoder.end();
  const lines = text.split('\n');
  lines.pop();
  const out = [];
  for (const line of lines) {
    try {
      out.push(JSON.stringify(norm(JSON.parse(line))));
    } catch (e) {
      out.push('ERR ' + e.message);
    }
  }
  process.stdout.write(out.join('\n') + '\n');
});
