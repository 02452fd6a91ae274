//! Helpers for the integration tests: start the binaries, talk to the broker and emulator.
