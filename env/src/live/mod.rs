//! The live host. Under construction.
