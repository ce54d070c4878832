//! The discrete-event simulator (see `SIMULATOR.md`). Under construction.
