//! Round-robin dispatch (`lib/internal/cluster/round_robin_handle.js`).
