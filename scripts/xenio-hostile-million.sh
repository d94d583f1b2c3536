#!/bin/sh
# Run the hostile-guest test with 1,000,000 requests (two rings: x86_64 order 3 and
# x86_32 order 3) through the real tapdisk request path, in release mode.
set -eu
cd "$(dirname "$0")/.."
exec cargo test --release --test xenio_hostile -- --ignored --nocapture hostile_stream_million
