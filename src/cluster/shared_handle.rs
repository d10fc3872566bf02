//! Shared handles (`lib/internal/cluster/shared_handle.js`).
