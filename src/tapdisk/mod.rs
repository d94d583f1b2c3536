//! tapdisk daemon (placeholder)
